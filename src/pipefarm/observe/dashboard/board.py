"""What the dashboard shows of one run, read at most once per refresh whoever asks.

A :class:`Board` holds the last payload of its run (the overview, running tasks, workers,
failure groups, throughput, durations, the task stream) with the JSON bytes the server sends, and
the data ``/metrics`` is made of. Any number of browser tabs, SSE streams and scrapes within
:data:`REFRESH_S` share one read; a finished run whose catalog files did not change is not read
again at all. Reads go through :mod:`pipefarm.observe.snapshot` (read-only connections to the
WAL catalog: they never block the run's writer).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..snapshot import catalog_version

#: seconds between two reads of one run's catalog, whatever the number of clients: the
#: issue's "about once a second". Bench W11 (W1, 100,000 no-op tasks on 2 cores, /metrics and
#: /api/snapshot read every second): 0.98x the unwatched rate served from a child process
#: (execute(dashboard=True)), 0.91x from a thread of the run's process (run.serve())
REFRESH_S = 1.0

#: bars of the task stream (Gantt) sent per refresh: the latest attempts; enough to fill a
#: screen's width with detail, small enough to keep a refresh of a 1M-task run fast
STREAM_BARS = 2000

#: seconds between two reads of the duration histogram while the run changes: it scans every
#: succeeded attempt (0.34 s on a 1,000,000-task catalog), and Prometheus scrapes every 15 s
#: by default; a finished run's is read once
HIST_REFRESH_S = 5.0

#: seconds between two reads of the charts (throughput, durations, task stream) while the run
#: is worked on: they cost most of a refresh (0.23 of 0.25 s on a 100,000-task catalog) while
#: counts, running tasks, workers and failures stay at :data:`REFRESH_S`
SLOW_REFRESH_S = 5.0

#: failure groups on the page, each with its example's output tail
FAILURE_GROUPS = 10

#: task ids listed per failure group (the group's count says how many there are)
GROUP_IDS = 200

#: bytes of an example's stderr shown with its failure group
EXAMPLE_TAIL = 4096

#: bytes of each stream of an attempt on the task page (its tail: errors come last)
LOG_TAIL = 65536


def _tail(data: bytes, n: int) -> str:
    text = data[-n:].decode("utf-8", "replace")
    return (f"[... {len(data) - n:,} bytes before]\n" if len(data) > n else "") + text


def _jsonable(x: Any) -> Any:
    """Dataclasses, msgspec structs and tuples as plain JSON values."""
    import dataclasses

    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(x).items()}
    if hasattr(x, "__struct_fields__"):
        return {k: _jsonable(getattr(x, k)) for k in x.__struct_fields__}
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and x != x:  # NaN is no JSON
        return None
    return x


def encode(obj: Any) -> bytes:
    """``obj`` as compact JSON bytes."""
    return json.dumps(_jsonable(obj), separators=(",", ":"), allow_nan=False).encode()


class Board:
    """One run's dashboard data, cached per refresh (thread-safe)."""

    def __init__(self, run_dir: str | os.PathLike[str], name: str = "") -> None:
        self.path = Path(run_dir)
        self.name = name or self.path.name
        self._lock = threading.Lock()
        self._metrics_lock = threading.Lock()
        self._hist_lock = threading.Lock()
        self._payload: dict[str, Any] | None = None
        self._bytes = b""
        self._read_at = 0.0
        self._sig: tuple | None = None
        #: bumped whenever the payload changes: an SSE stream sends only new versions
        self.version = 0
        self._metrics: dict[str, Any] | None = None
        self._metrics_sig: int | None = None  # the payload version it was made from
        self._hist: dict[str, Any] | None = None
        self._hist_sig: tuple | None = None  # the catalog files' signature when read
        self._hist_at = 0.0
        self._slow: dict[str, Any] | None = None  # throughput, durations, stream
        self._slow_at = 0.0
        self._slow_json = b"{}"
        self._slow_keys: frozenset[str] = frozenset()

    def _fresh(self, read_at: float, sig: tuple | None, live: bool) -> bool:
        now = time.monotonic()
        if now - read_at < REFRESH_S:
            return True
        # a run nobody works on, whose files did not change: what we read is still true
        return not live and sig is not None and sig == catalog_version(self.path) \
            and not (self.path / "fs").is_dir()

    def payload(self) -> tuple[dict[str, Any], bytes, int]:
        """The page's live payload, its JSON bytes and its version."""
        with self._lock:
            p = self._payload
            if p is None or not self._fresh(self._read_at, self._sig, p["overview"]["live"]):
                sig = catalog_version(self.path)
                p = self._read()
                self._read_at, self._sig = time.monotonic(), sig
                # the charts' JSON is made once per read of them, not once a second
                fast = encode({k: v for k, v in p.items() if k not in self._slow_keys})
                b = fast[:-1] + b"," + self._slow_json[1:] if self._slow_json != b"{}" else fast
                if b != self._bytes:
                    self._payload, self._bytes = p, b
                    self.version += 1
            return self._payload, self._bytes, self.version  # type: ignore[return-value]

    def _read(self) -> dict[str, Any]:
        from .. import snapshot as snap

        d = self.path
        out = _jsonable(snap.snapshot(d))
        groups = _jsonable(snap.failure_groups(d, limit=FAILURE_GROUPS))
        for g in groups:
            g["task_ids"] = g["task_ids"][:GROUP_IDS]
            g["example_stderr"] = self._stderr_tail(g["example_task"])
        out["failures"] = groups
        out["run"] = self.name
        out["attempts"] = snap.attempt_totals(d)
        now = time.monotonic()
        live = out["overview"]["live"]
        if self._slow is None or not live or now - self._slow_at >= SLOW_REFRESH_S:
            def charts() -> dict[str, Any]:
                return {"throughput": _jsonable(snap.throughput(d)),
                        "durations": _jsonable(snap.durations(d)),
                        "stream": _jsonable(snap.task_stream(d, limit=STREAM_BARS))}

            # an idle run's charts are kept with it (snapshot.VIEWS_CACHE): a fresh server of
            # a finished 1,000,000-task run then skips ~0.2 s of reads
            self._slow = charts() if live else snap.cached(d, f"charts{STREAM_BARS}", charts,
                                                            keep=True)
            self._slow_at = now
            self._slow_json = encode(self._slow)
            self._slow_keys = frozenset(self._slow)
        out.update(self._slow)
        return out

    def _stderr_tail(self, task: int) -> str:
        from ...execute.output import read_output
        from ...store.sqlite.query import CatalogQuery

        try:
            with CatalogQuery.open(self.path) as q:
                ref = q.output_ref(task)
            return _tail(read_output(self.path, ref, "stderr"), EXAMPLE_TAIL)
        except (OSError, KeyError):
            return ""

    def metrics(self) -> dict[str, Any]:
        """:func:`~pipefarm.observe.metrics.metric_data` from :meth:`payload` (one read for
        pages and scrapes) and :meth:`histogram`, cached as the payload is."""
        from ..metrics import metric_data

        payload, _, version = self.payload()
        with self._metrics_lock:  # not the payload's lock: a page never waits for the histogram
            if self._metrics is None or self._metrics_sig != version:
                self._metrics = metric_data(self.path, payload, self.histogram())
                self._metrics_sig = version
            return self._metrics

    def histogram(self) -> dict[str, Any]:
        """The duration histogram of ``/metrics``: read again only when the catalog changed,
        and then at most every :data:`HIST_REFRESH_S`."""
        from ..metrics import duration_data

        with self._hist_lock:
            now = time.monotonic()
            sig = catalog_version(self.path)
            if self._hist is None or (self._hist_sig != sig and now - self._hist_at >= HIST_REFRESH_S):
                self._hist = duration_data(self.path)
                self._hist_sig, self._hist_at = sig, now
            return self._hist

    def warm(self) -> None:
        """Read the run now, so that the first page or scrape finds it read: the page's
        payload and the histogram in two threads (SQLite lets go of the GIL while it reads,
        so on two cores a cold 1,000,000-task catalog takes the longer of the two, not the
        sum)."""
        for target in (self.payload, self.histogram):
            threading.Thread(target=target, name="pipefarm-board-warm", daemon=True).start()

    def task(self, task: int) -> dict[str, Any]:
        """One task in full (``pipefarm show``) with each attempt's stdout and stderr tails;
        ``KeyError`` if there is no such task."""
        from ...execute.output import read_output
        from ...store.sqlite.query import CatalogQuery
        from ..show import show_task

        info = show_task(SimpleNamespace(path=self.path), task)
        with CatalogQuery.open(self.path) as q:
            for a in info["attempts"]:
                for stream in ("stdout", "stderr"):
                    try:
                        ref = q.output_ref(task, a["attempt"])
                        a[stream] = _tail(read_output(self.path, ref, stream), LOG_TAIL)
                    except (OSError, KeyError) as exc:
                        a[stream] = f"[cannot read it: {exc}]"
        return info

    def log(self, task: int, attempt: int | None, stream: str) -> bytes:
        """Exactly what ``attempt`` (None: the latest) of ``task`` printed on ``stream``."""
        from ...execute.output import read_output
        from ...store.sqlite.query import CatalogQuery

        with CatalogQuery.open(self.path) as q:
            ref = q.output_ref(task, attempt)
        return read_output(self.path, ref, stream)

    def group_ids(self, signature: str) -> list[int]:
        """Every task of the failure group with this signature (empty: no such group now)."""
        from ..failures import failures

        for g in failures(SimpleNamespace(path=self.path)):
            if g.signature == signature:
                return list(g.task_ids)
        return []

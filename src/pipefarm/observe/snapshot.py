"""The shared read model of a run: what ``watch``, the dashboard, ``/metrics`` and the report show.

Every function takes a run directory, folds a shared-filesystem run's journals first (as
``pipefarm status`` does: :func:`prepare`), reads through one read-only
:class:`~pipefarm.store.sqlite.query.CatalogQuery`, and returns plain records.
:func:`snapshot` is the live payload (overview, running tasks, workers, failure groups) read
with one fold and one query connection.

Cost: each query is an index range or a bounded scan (see the ``# --- the shared read model``
block of ``query.py``), except the per-worker attempt counts, a full scan of ``tasks``; that one
is cached per run directory and recomputed only when the catalog changed and at most once per
:data:`RECOMPUTE_FACTOR` times its own cost, so a view never spends more than a small fraction
of a core on it (the run's writer is never slowed: readers take no lock in WAL mode).
"""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..states import Outcome, State
from ..store.sqlite.query import CatalogQuery
from ..store.sqlite.schema import build_views_index
from .failures import FailureGroup, group_failures
from .status import RATE_WINDOW_S, coordinator_alive, progress_of, run_lease

T = TypeVar("T")

#: a cached aggregate is recomputed at most once per this many times what it took (10: under
#: 10% of one core even on a 1,000,000-task run, where the per-worker scan takes ~250 ms)
RECOMPUTE_FACTOR = 10.0
#: durations are read from the latest succeeded tasks only (20,000 take ~40 ms to read on the
#: 2-CPU development host, 100,000 ~180 ms; percentiles of 20,000 are plenty for a chart)
DURATION_SAMPLE = 20_000
#: failure groups are made of at most this many failed tasks, the latest (grouping 1,000 takes
#: ~9 ms: 50,000 take ~0.5 s, cached like the per-worker counts; a run with more failures than
#: that says so in its counts anyway)
FAILURE_SAMPLE = 50_000
#: task ids kept per failure group (the count still says how many there are)
GROUP_EXAMPLES = 20
#: histogram bins per spec in :func:`durations`
DURATION_BINS = 20


# --- the records ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Overview:
    """What ``pipefarm status`` shows, as a record."""

    run: str
    total: int
    counts: dict[str, int]  # every state label, zeros included
    done: int
    live: bool
    throughput_per_s: float
    eta_s: float | None
    now: float


@dataclass(frozen=True)
class RunningTask:
    """A task running now."""

    id: int
    label: str  # its key, else its spec's name, else "task <id>"
    worker: str | None
    elapsed_s: float


@dataclass(frozen=True)
class WorkerView:
    """A worker: a local one from the catalog, or an array worker from its heartbeat file."""

    id: str
    host: str | None
    pid: int | None
    done: int  # attempts it ended
    running: int
    heartbeat_age_s: float | None
    state: str  # "alive" | "stale" (heartbeat older than the lease) | "gone"


@dataclass(frozen=True)
class DurationStats:
    """Durations of one spec's succeeded attempts (a sample of the latest, see
    :data:`DURATION_SAMPLE`)."""

    name: str
    count: int
    p50: float
    p95: float
    max: float
    edges: list[float]  # len(counts) + 1 bin edges, log-spaced (even when all are equal)
    counts: list[int]


@dataclass(frozen=True)
class AttemptBar:
    """One attempt on a worker's time line (a Gantt bar)."""

    task: int
    attempt: int
    worker: str | None
    start: float
    end: float | None  # None: running
    outcome: str  # an Outcome label, or "running"


# --- opening -------------------------------------------------------------------------------------
def prepare(run_dir: str | os.PathLike[str]) -> Path:
    """Fold what a shared-filesystem run's workers journaled into its catalog, as ``pipefarm
    status`` does (nothing for other runs); the run's path.

    ``FileNotFoundError`` when there is no run there.
    """
    p = Path(run_dir)
    if not (p / "catalog.db").exists():
        raise FileNotFoundError(f"no run at {p} (no catalog.db there)")
    if (p / "fs").is_dir():
        from ..backends.array import sync
        from ..run import Run

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a directory others can write: folding reads no pickle
            run = Run.open(p, readonly=True)
        try:
            sync(run)
        finally:
            run.close()
    else:  # an idle run gets the index that makes views fast (a run drops it as it starts)
        build_views_index(p, lambda: not coordinator_alive(p))
    return p


@contextmanager
def reader(run_dir: str | os.PathLike[str], fold: bool = True) -> Iterator[CatalogQuery]:
    """One read-only query connection to a (folded) run, for several reads in a row."""
    p = prepare(run_dir) if fold else Path(run_dir)
    q = CatalogQuery.open(p)
    try:
        yield q
    finally:
        q.close()


# --- the reads -----------------------------------------------------------------------------------
def overview(run_dir: str | os.PathLike[str]) -> Overview:
    """Counts by state, rate and ETA (``pipefarm status``'s head)."""
    with reader(run_dir) as q:
        return _overview(run_dir, q)


def _overview(run_dir: str | os.PathLike[str], q: CatalogQuery) -> Overview:
    now = time.time()
    rep = progress_of(run_dir, q, RATE_WINDOW_S, now=now)
    return Overview(now=now, **rep)


def running(run_dir: str | os.PathLike[str], limit: int = 50) -> list[RunningTask]:
    """Up to ``limit`` running tasks, the longest-running first."""
    with reader(run_dir) as q:
        return _running(q, limit)


def _running(q: CatalogQuery, limit: int) -> list[RunningTask]:
    now = time.time()
    return [RunningTask(t, key or name or f"task {t}", w, max(0.0, now - t0) if t0 else 0.0)
            for t, key, name, w, t0 in q.running_rows(limit)]


def workers(run_dir: str | os.PathLike[str]) -> list[WorkerView]:
    """Every worker: the catalog's (local coordinators' workers, array workers once folded) and
    array workers known only by their heartbeat files (``RUN/fs/hb``)."""
    p = prepare(run_dir)
    with reader(p, fold=False) as q:
        return _workers(p, q)


def _workers(run_dir: Path, q: CatalogQuery) -> list[WorkerView]:
    now = time.time()
    lease = run_lease(run_dir)
    done = cached(run_dir, "ended_by_worker", q.ended_by_worker, keep=True)
    busy = q.running_by_worker()
    out: dict[str, WorkerView] = {}
    beats = _heartbeat_files(run_dir)
    # a local worker lives only as long as its coordinator: with none, its row is history
    # (it may not be marked gone: a killed coordinator marks nothing)
    coordinator = coordinator_alive(run_dir)
    array_ids = {wid for wid, _ in beats}
    for wid, host, pid, _started, hb, gone in q.worker_rows():
        age = max(0.0, now - hb) if hb is not None else None
        local_orphan = not coordinator and wid not in array_ids
        state = ("gone" if gone or local_orphan
                 else "stale" if age is None or age > lease else "alive")
        out[wid] = WorkerView(wid, host, pid, done.get(wid, 0), busy.get(wid, 0), age, state)
    for wid, mtime in beats:
        age = max(0.0, now - mtime)
        host, pid = _host_pid(wid)
        state = "alive" if age < lease else "stale"
        old = out.get(wid)
        if old is None or old.heartbeat_age_s is None or age < old.heartbeat_age_s:
            out[wid] = WorkerView(wid, old.host if old and old.host else host,
                                  old.pid if old and old.pid else pid,
                                  done.get(wid, 0), busy.get(wid, 0), age, state)
    # running work a worker holds (e.g. one the catalog has no row for) still shows
    for wid, n in busy.items():
        if wid not in out:
            host, pid = _host_pid(wid)
            out[wid] = WorkerView(wid, host, pid, done.get(wid, 0), n, None, "stale")
    return sorted(out.values(), key=lambda w: ({"alive": 0, "stale": 1, "gone": 2}[w.state], w.id))


def _heartbeat_files(run_dir: Path) -> list[tuple[str, float]]:
    """``(worker id, mtime)`` of the array workers' heartbeat files."""
    try:
        entries = list(os.scandir(run_dir / "fs" / "hb"))
    except OSError:
        return []
    out = []
    for e in entries:
        if e.name == "catalog" or e.name.startswith("fold-"):
            continue  # the catalog's own stamp and fold lock holders are no workers
        try:
            out.append((e.name, e.stat().st_mtime))
        except OSError:
            continue
    return out


def _host_pid(worker: str) -> tuple[str | None, int | None]:
    """Host and pid from an array worker's id (``[prefix-]host-pid-random``), where it has them."""
    parts = worker.rsplit("-", 2)
    if len(parts) == 3 and parts[1].isdigit():
        return parts[0], int(parts[1])
    return None, None


def failure_groups(run_dir: str | os.PathLike[str], limit: int = 10) -> list[FailureGroup]:
    """The biggest ``limit`` failure groups (``pipefarm failures``) of the latest
    :data:`FAILURE_SAMPLE` failed tasks, each with at most :data:`GROUP_EXAMPLES` task ids."""
    p = prepare(run_dir)
    with reader(p, fold=False) as q:
        return _failure_groups(p, q, limit)


def _failure_groups(run_dir: Path, q: CatalogQuery, limit: int) -> list[FailureGroup]:
    groups = cached(run_dir, "failure_groups", lambda: group_failures(
        q.failed_latest(FAILURE_SAMPLE), examples=GROUP_EXAMPLES))
    return groups[:limit]


def throughput(run_dir: str | os.PathLike[str], buckets: int = 60) -> list[tuple[float, int]]:
    """``(bucket start, tasks that succeeded or failed in it)`` over the run's span, in
    ``buckets`` even buckets from the first end to the last (epoch seconds)."""
    with reader(run_dir) as q:
        lo, hi = q.end_span()
        if lo is None or hi is None:
            return []
        buckets = max(1, int(buckets))
        width = (hi - lo) / buckets if hi > lo else 1.0
        starts = [lo + i * width for i in range(buckets)]
        return list(zip(starts, q.ends_per_bucket(lo, width, buckets), strict=True))


def durations(run_dir: str | os.PathLike[str]) -> list[DurationStats]:
    """Durations of succeeded attempts per spec name (function or command name), from the
    latest :data:`DURATION_SAMPLE`; the most frequent name first."""
    with reader(run_dir) as q:
        rows = q.succeeded_durations(DURATION_SAMPLE)
    by: dict[str, list[float]] = {}
    for name, d in rows:
        by.setdefault(name or "(unnamed)", []).append(max(0.0, float(d)))
    return sorted((_stats(n, v) for n, v in by.items()), key=lambda s: (-s.count, s.name))


def _stats(name: str, values: list[float]) -> DurationStats:
    values.sort()
    n = len(values)

    def pct(p: float) -> float:
        return values[min(n - 1, max(0, math.ceil(p * n) - 1))]

    lo = max(values[0], 1e-6)
    hi = max(values[-1], lo * 1.0001)
    step = (math.log(hi) - math.log(lo)) / DURATION_BINS
    edges = [math.exp(math.log(lo) + i * step) for i in range(DURATION_BINS + 1)]
    edges[0], edges[-1] = min(values[0], lo), hi
    counts = [0] * DURATION_BINS
    for v in values:
        i = int((math.log(max(v, lo)) - math.log(lo)) / step) if step > 0 else 0
        counts[min(DURATION_BINS - 1, max(0, i))] += 1
    return DurationStats(name, n, pct(0.5), pct(0.95), values[-1], edges, counts)


def task_stream(run_dir: str | os.PathLike[str], since: float | None = None,
                limit: int = 5000) -> list[AttemptBar]:
    """The attempts running now and the latest ``limit`` ended ones (ended at or after
    ``since``), oldest start first: the bars of a Gantt chart per worker."""
    with reader(run_dir) as q:
        rows = q.latest_attempt_rows(since, limit)
    bars = []
    for task, attempt, worker, start, end, outcome, st in rows:
        if start is None:
            continue
        if outcome is None or st in (int(State.CLAIMED), int(State.RUNNING)):
            label, end = "running", None
        else:
            label = Outcome(outcome).label
        bars.append(AttemptBar(task, attempt, worker, start, end, label))
    bars.sort(key=lambda b: (b.end is None, b.end or 0.0), reverse=True)
    bars = bars[:limit] if len(bars) > limit else bars
    return sorted(bars, key=lambda b: (b.start, b.task, b.attempt))


def attempt_totals(run_dir: str | os.PathLike[str]) -> dict[str, int]:
    """Attempts by outcome label (every :class:`~pipefarm.states.Outcome`, zeros included)."""
    p = prepare(run_dir)

    def read() -> dict[str, int]:
        with reader(p, fold=False) as q:
            by = q.outcome_counts()
        return {o.label: by.get(int(o), 0) for o in Outcome}

    return dict(cached(p, "attempt_totals", read, keep=True))  # a full scan of 1M: ~36 ms


def snapshot(run_dir: str | os.PathLike[str], running_limit: int = 50,
             failure_limit: int = 10) -> dict[str, Any]:
    """The live payload, JSON-ready: ``{"overview", "running", "workers", "failures"}``
    (one fold, one query connection)."""
    p = prepare(run_dir)
    with reader(p, fold=False) as q:
        ov = _overview(p, q)
        return {
            "overview": asdict(ov),
            "running": [asdict(r) for r in _running(q, running_limit)],
            "workers": [asdict(w) for w in _workers(p, q)],
            "failures": [_group_dict(g) for g in _failure_groups(p, q, failure_limit)],
        }


def _group_dict(g: FailureGroup) -> dict[str, Any]:
    return {"signature": g.signature, "count": g.count, "example_task": g.example_task,
            "example_error": g.example_error, "task_ids": list(g.task_ids)}


# --- the cache of the costly aggregates ----------------------------------------------------------
@dataclass
class _Memo:
    version: tuple[int, ...]
    at: float
    cost: float
    value: Any


_memo: dict[tuple[str, str], _Memo] = {}
_memo_lock = threading.Lock()


def catalog_version(run_dir: Path) -> tuple[int, ...]:
    """Changes whenever the catalog may have (its file's and its WAL's size and mtime)."""
    out: list[int] = []
    for name in ("catalog.db", "catalog.db-wal"):
        try:
            st = os.stat(run_dir / name)
            out += [st.st_mtime_ns, st.st_size]
        except OSError:
            out += [0, 0]
    return tuple(out)


def cached(run_dir: Path, name: str, compute: Callable[[], T], *, keep: bool = False) -> T:
    """``compute()``, reused while the catalog is unchanged, or while less than
    :data:`RECOMPUTE_FACTOR` times its last cost has passed.

    With ``keep`` (plain values only: dicts, lists, numbers, strings), the value of an idle run
    is also kept in ``RUN/`` :data:`VIEWS_CACHE`, so that a fresh process (a new server, a
    scrape after a restart) reads a finished run's full-scan aggregates without the scan.
    """
    run_dir = Path(run_dir)
    key = (str(run_dir.resolve()), name)
    version = catalog_version(run_dir)
    now = time.monotonic()
    with _memo_lock:
        hit = _memo.get(key)
    if hit is not None and (hit.version == version or now - hit.at < hit.cost * RECOMPUTE_FACTOR):
        return hit.value
    kept = _kept(run_dir, name, version) if keep else None
    t0 = time.perf_counter()
    value = kept if kept is not None else compute()
    with _memo_lock:
        _memo[key] = _Memo(version, now, time.perf_counter() - t0, value)
    if keep and kept is None and not coordinator_alive(run_dir):
        _keep(run_dir, name, version, value)
    return value


#: file in a run directory that keeps full-scan aggregates of the idle run, by catalog version
VIEWS_CACHE = "views-cache.msgpack"


def _kept(run_dir: Path, name: str, version: tuple[int, ...]) -> Any:
    import msgspec

    try:
        entry = msgspec.msgpack.decode((run_dir / VIEWS_CACHE).read_bytes()).get(name)
    except (OSError, msgspec.DecodeError, AttributeError):
        return None
    if not isinstance(entry, list) or len(entry) != 2 or tuple(entry[0]) != version:
        return None
    return entry[1]


def _keep(run_dir: Path, name: str, version: tuple[int, ...], value: Any) -> None:
    """Add ``value`` to the run's :data:`VIEWS_CACHE` (entries of older versions dropped);
    where the run cannot be written, nothing is kept."""
    import msgspec

    path = run_dir / VIEWS_CACHE
    try:
        old = msgspec.msgpack.decode(path.read_bytes())
    except (OSError, msgspec.DecodeError):
        old = {}
    entries = {k: v for k, v in old.items() if isinstance(v, list) and tuple(v[0]) == version} \
        if isinstance(old, dict) else {}
    entries[name] = [list(version), value]
    tmp = path.with_name(f".{VIEWS_CACHE}.{os.getpid()}")
    try:
        tmp.write_bytes(msgspec.msgpack.encode(entries))
        os.replace(tmp, path)
    except (OSError, TypeError):
        tmp.unlink(missing_ok=True)

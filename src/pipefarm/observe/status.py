"""What a run looks like now: counts, throughput, ETA and the latest failures (read only).

An ETA is given only while the run is being worked on -- a live coordinator (``pipefarm run``
holds ``RUN/coordinator.lock``) or array workers whose heartbeats are fresh -- because a
stopped run finishes never, whatever its last minute's throughput was.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import states
from ..store.sqlite.query import CatalogQuery

#: throughput is measured over the tasks that ended in this many recent seconds
RATE_WINDOW_S = 60.0


def coordinator_alive(run_dir: str | os.PathLike[str]) -> bool:
    """Whether a ``pipefarm run`` holds ``RUN/coordinator.lock`` now (same host).

    Reads ``/proc/locks`` where there is one, so that looking never takes the lock (a
    ``pipefarm run`` starting at that moment would find it busy); elsewhere it tries a shared
    lock for an instant.
    """
    path = Path(run_dir) / "coordinator.lock"
    try:
        st = path.stat()
    except OSError:
        return False
    try:
        with open("/proc/locks") as f:
            locks = f.read()
    except OSError:
        locks = None
    if locks is not None:
        dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        return any(line.split()[5:6] == [dev] for line in locks.splitlines()
                   if " FLOCK " in line and "->" not in line)
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops the shared lock, if we got it
    return False


def _live_heartbeats(run_dir: str | os.PathLike[str], lease_s: float) -> list[os.DirEntry]:
    """The heartbeat files of array workers younger than the lease."""
    hb = Path(run_dir) / "fs" / "hb"
    try:
        entries = list(os.scandir(hb))
    except OSError:
        return []
    now = time.time()
    live = []
    for e in entries:
        if e.name == "catalog" or e.name.startswith("fold-"):
            continue  # the catalog's own stamp and fold lock holders are no workers
        try:
            if now - e.stat().st_mtime < lease_s:
                live.append(e)
        except OSError:
            continue
    return live


def live_workers(run_dir: str | os.PathLike[str], lease_s: float) -> int:
    """Array workers of a shared-filesystem run whose heartbeat is younger than the lease."""
    return len(_live_heartbeats(run_dir, lease_s))


def longest_time_left(run_dir: str | os.PathLike[str], lease_s: float) -> float | None:
    """The most walltime (seconds, before its warning) any live array worker has left to
    start tasks; None when no worker is live or one has no known limit (it takes any task)."""
    from ..store.shared_fs.claimant import HB_UNTIL

    now, longest = time.time(), None
    for e in _live_heartbeats(run_dir, lease_s):
        try:
            with open(e.path) as fh:
                word, _, value = fh.read(100).partition(" ")
            until = float(value) if word == HB_UNTIL else None
        except (OSError, ValueError):
            until = None
        if until is None:
            return None
        longest = max(longest if longest is not None else until - now, until - now)
    return longest


def being_worked_on(run: Any) -> bool:
    """Whether a coordinator or live array workers are running ``run`` now."""
    return worked_on(run.path, lambda: _lease_of_run(run))


def _lease_of_run(run: Any) -> float:
    from ..backends.array import lease_of

    return lease_of(run)


def run_lease(run_dir: str | os.PathLike[str]) -> float:
    """The lease a run's workers are judged by, from its directory alone: ``fs/config``'s for
    a shared-filesystem run, else the store's default (what ``pipefarm run`` uses)."""
    from ..store.base import DEFAULT_LEASE_S

    if (Path(run_dir) / "fs").is_dir():
        from ..store.shared_fs import Layout, read_config

        cfg = read_config(Layout(run_dir))
        if cfg is not None:
            return float(cfg.lease_s)
    return DEFAULT_LEASE_S


def worked_on(run_dir: str | os.PathLike[str], lease: Callable[[], float] | None = None) -> bool:
    """:func:`being_worked_on` from the run directory; ``lease`` gives the array workers' lease
    (default :func:`run_lease`), asked only for a shared-filesystem run without a coordinator."""
    if coordinator_alive(run_dir):
        return True
    if not (Path(run_dir) / "fs").is_dir():
        return False
    return live_workers(run_dir, (lease or (lambda: run_lease(run_dir)))()) > 0


def estimate_eta(queued: int, running_elapsed: list[float], rate: float,
                 mean_duration: float | None) -> float | None:
    """Seconds until the run ends: the running tasks finish after about the mean duration of
    recent tasks (less what they have run), the queued ones at the recent completion rate."""
    remaining = [max(0.0, mean_duration - el) for el in running_elapsed] if mean_duration else []
    if queued == 0:
        if not running_elapsed:
            return 0.0
        return max(remaining) if remaining else None
    if rate <= 0:
        return None
    return queued / rate + (sum(remaining) / len(remaining) if remaining else 0.0)


def status_report(run: Any, window_s: float = RATE_WINDOW_S, last_failures: int = 5) -> dict[str, Any]:
    """The status of ``run`` as a JSON-ready dict (``pipefarm status --json``)."""
    with CatalogQuery.open(run.path) as q:
        return _report(run, q, window_s, last_failures)


def progress_of(run_dir: str | os.PathLike[str], q: CatalogQuery, window_s: float = RATE_WINDOW_S,
                now: float | None = None,
                live: Callable[[], bool] | None = None) -> dict[str, Any]:
    """The numbers at the head of ``pipefarm status``: ``run, total, counts, done, live,
    throughput_per_s, eta_s`` (what :func:`status_report` and the live views share).
    ``live`` says whether the run is being worked on (default :func:`worked_on`)."""
    counts = q.counts()
    total = sum(counts.values())
    now = time.time() if now is None else now
    n_recent, first, mean = q.recent_ends(now - window_s)
    span = (now - first) if first else 0.0
    # at least the window's first task's own duration: one task ending just now is not a
    # burst of infinite speed
    span = max(span, mean or 0.0)
    rate = n_recent / span if n_recent and span > 0 else 0.0
    queued = sum(counts[s.label] for s in states.QUEUED)
    left = queued + counts["running"]
    is_live = (live or (lambda: worked_on(run_dir)))() if left else False
    eta = None
    if is_live:  # only then is an ETA given, so only then are the running tasks read
        if mean is None:  # nothing ended lately: the recent tasks' mean duration
            mean = q.recent_mean_duration()
        running = [now - t0 for t0 in q.running_since()]
        eta = estimate_eta(queued, running, rate, mean)
    return {
        "run": str(run_dir),
        "total": total,
        "counts": counts,
        "done": sum(counts[s.label] for s in states.TERMINAL),
        "live": is_live,  # a coordinator or live array workers are running it now
        "throughput_per_s": round(rate, 3),
        "eta_s": round(eta, 1) if eta is not None else None,
    }


def _report(run: Any, q: CatalogQuery, window_s: float, last_failures: int) -> dict[str, Any]:
    rep = progress_of(run.path, q, window_s, live=lambda: being_worked_on(run))
    rep["last_failures"] = [
        {"task_id": t, "key": k, "exit_code": code, "error": (err or "").strip().splitlines()[-1:] and
         (err or "").strip().splitlines()[-1], "ended_at": ended_at}
        for t, k, code, err, ended_at in q.last_failed(last_failures)
    ]
    rep["last_notes"] = [  # e.g. output cut at its cap
        {"task_id": t, "note": note}
        for t, note in q.last_notes(last_failures)
    ]
    rep["backends"] = q.backends_used()  # where it has executed, first use first
    rep["cached"] = q.cached_count()  # succeeded tasks whose result came from the cache
    rep["waiting_for_time"], rep["longest_time_left_s"] = _waiting_for_time(run.path, q)
    return rep


def _waiting_for_time(run_dir: str | os.PathLike[str], q: CatalogQuery) -> tuple[int, float | None]:
    """Ready tasks that asked for more time (``time_request``) than any live array worker
    has left, and that longest time left (0 and None while no such worker is live)."""
    if not (Path(run_dir) / "fs").is_dir():
        return 0, None
    longest = longest_time_left(run_dir, run_lease(run_dir))
    if longest is None:
        return 0, None
    return q.ready_asking_more_than(longest), round(longest, 1)

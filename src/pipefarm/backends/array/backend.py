"""The array backend: export, submit, wait, fold. Workers run in a scheduler's job array, or
are launched inside an allocation.

The submitting process holds the catalog: it exports ready tasks as blocks
(:func:`pipefarm.store.shared_fs.export`), submits the array, and with ``wait`` follows it: it asks
the scheduler how the job stands at most once per ``poll_s`` (30 s by default, gentle on the
scheduler), and folds the workers' journals into the catalog every ``fold_s`` seconds, exporting
new waves as dependencies succeed. Workers (``pipefarm worker``) coordinate through the run
directory alone.

The wait ends when the scheduler says the array ended, or when the scheduler no longer reports
the job at all (a site without accounting forgets an ended job: ``squeue`` and ``sacct`` say
nothing, ``scontrol`` forgets it after ``MinJobAge``) for :data:`GONE_POLLS` polls in a row
while no worker's heartbeat is alive (:class:`HeartbeatWatch`): then the array is over,
whatever is left. :attr:`ArrayBackend.ended` says which.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...states import LEFT
from ..base import Summary
from .launchers import launch_command
from .registry import poll_state, submit, write_scripts
from .spec import ArraySpec

ProgressFn = Callable[[dict[str, int]], None]


def sync(run: Any) -> Any:
    """Fold the journals of a shared-filesystem run into its catalog (nothing if it has none)."""
    if not (Path(run.path) / "fs").is_dir():
        return None
    from ...store.shared_fs import fold

    return fold(run.path, run.store)


def export(run: Any, workers: int) -> Any:
    """Fold, then offer every ready task not yet in a block as new blocks (one wave)."""
    from ...store.shared_fs import Layout, write_config
    from ...store.shared_fs import export as export_wave

    layout = Layout(run.path)
    layout.make()
    write_config(layout, run.store.lease_s)
    sync(run)
    return export_wave(layout, run.store, workers=max(1, workers))


def lease_of(run: Any) -> float:
    """The lease the run's workers judge each other by: ``fs/config``'s, fixed at the first
    export (``pipefarm array --lease``), else the catalog's default."""
    from ...store.shared_fs import Layout, read_config

    cfg = read_config(Layout(run.path)) if (Path(run.path) / "fs").is_dir() else None
    return float(cfg.lease_s) if cfg is not None else float(run.store.lease_s)


def recall(run: Any, *, dead: bool = False) -> int:
    """Take back into the catalog the blocks that no live worker holds.

    With ``dead`` (the array has ended), every holder counts as gone.
    """
    from ...store.shared_fs import Layout, recall_blocks, server_now_ns

    if not (Path(run.path) / "fs").is_dir():
        return 0
    layout = Layout(run.path)
    sync(run)
    ref = server_now_ns(os.path.join(layout.hb, "catalog"))
    lease = 0.0 if dead else lease_of(run)
    with run.store.transaction():
        return recall_blocks(layout, run.store, lease_s=lease, ref_ns=ref)


#: States of a task that an array has not finished, in the order they are shown.
LEFT_STATES = tuple(s.label for s in sorted(LEFT))

#: Consecutive scheduler polls that must not find the job before it counts as gone: one miss can
#: be a transient failure of the query (a busy controller), and a pending array has no worker
#: heartbeats to say it is still there.
GONE_POLLS = 2


def counts_left(counts: dict[str, int]) -> dict[str, int]:
    """The unfinished states with a non-zero count."""
    return {k: counts[k] for k in LEFT_STATES if counts.get(k)}


def _counts_left(counts: dict[str, int]) -> int:
    return sum(counts_left(counts).values())


class HeartbeatWatch:
    """Whether any worker of a shared-filesystem run still heartbeats.

    Workers are the journals' owners (``fs/journal/<id>.log``); each one's heartbeat file is
    judged by :class:`~pipefarm.store.shared_fs.Liveness`: dead once its mtime stopped changing
    for ``lease_s`` of our monotonic clock (or ``lease_s / 2`` while also older than our own
    freshly touched heartbeat). A heartbeat seen for the first time counts as alive, so keep one
    watch across polls. One stat per worker per call.
    """

    def __init__(self, run_dir: str | os.PathLike[str], lease_s: float) -> None:
        from ...store.shared_fs import Layout, Liveness

        self.layout = Layout(run_dir)
        self.live = Liveness(lease_s)

    def alive(self) -> list[str]:
        """The workers whose heartbeat is (still) alive."""
        from ...store.shared_fs import mtime_ns, server_now_ns

        try:
            names = os.listdir(self.layout.journal)
        except FileNotFoundError:
            return []
        workers = sorted(n[:-4] for n in names if n.endswith(".log"))
        me = os.path.join(self.layout.hb, "catalog")

        def ref() -> int:
            return server_now_ns(me)

        return [w for w in workers
                if not self.live.dead(w, mtime_ns(self.layout.hb_of(w)), ref)]


class ArrayBackend:
    """Submit workers as a job array of ``scheduler`` and (optionally) follow it to the end."""

    name = "array"

    def __init__(self, scheduler: str, spec: ArraySpec, *, poll_s: float = 30.0,
                 fold_s: float = 5.0) -> None:
        self.scheduler = scheduler
        self.spec = spec
        self.poll_s = poll_s
        self.fold_s = fold_s
        #: how :meth:`wait` saw the array end: the scheduler's last state (``"done"``,
        #: ``"failed"``), ``"gone"`` (no longer reported and no live heartbeat) or
        #: ``"finished"`` (nothing left while the scheduler did not report the job)
        self.ended = ""

    def prepare(self, run: Any) -> Path:
        """Export the ready tasks and write the submit script; return its path."""
        export(run, self.spec.elements * self.spec.workers_per_element)
        return write_scripts(self.scheduler, self.spec)

    def submit(self, run: Any, script: Path) -> str:
        """Submit the script; record the job id in the run."""
        job = submit(self.scheduler, script)
        jobs = [j for j in str(run.store.meta("array_jobs", "") or "").split(",") if j]
        run.store.set_meta("array_jobs", ",".join([*jobs, f"{self.scheduler}:{job}"]))
        run.store.note_backend(self.name)
        return job

    def wait(self, run: Any, job: str, on_progress: ProgressFn | None = None) -> Summary:
        """Follow ``job`` to its end, folding as it goes; return the summary.

        Returns when the scheduler says the job ended, or when it has not reported the job for
        :data:`GONE_POLLS` polls in a row and no worker heartbeats (see :attr:`ended`): never
        waits on an array that is over, with or without the scheduler's accounting.
        """
        t0 = time.time()
        watch = HeartbeatWatch(run.path, lease_of(run))
        state = poll_state(self.scheduler, job)
        missed = int(state == "unknown")
        last_poll = time.monotonic()
        workers = self.spec.elements * self.spec.workers_per_element
        self.ended = ""
        while state in ("pending", "running", "unknown"):
            time.sleep(min(self.fold_s, self.poll_s))
            export(run, workers)  # folds; offers tasks whose dependencies just succeeded
            counts = run.store.counts()
            if on_progress is not None:
                on_progress(counts)
            # watched at every fold, not only at polls: Liveness needs to see mtimes not change
            beating = watch.alive() if missed else []
            if missed and _counts_left(counts) == 0:
                self.ended = "finished"
                break
            if missed >= GONE_POLLS and not beating:
                self.ended = "gone"
                break
            if time.monotonic() - last_poll >= self.poll_s:
                state = poll_state(self.scheduler, job)
                missed = missed + 1 if state == "unknown" else 0
                last_poll = time.monotonic()
        else:
            self.ended = state
        return finish(run, t0)


def launch(run: Any, launcher: str, n: int, *, signal: str = "TERM", fold_s: float = 5.0,
           on_progress: ProgressFn | None = None) -> Summary:
    """Start ``n`` workers with ``srun`` or ``mpiexec`` inside this allocation; wait for them."""
    t0 = time.time()
    run.store.note_backend("array")
    export(run, n)
    argv = launch_command(launcher, n, str(run.path), signal=signal)
    proc = subprocess.Popen(argv)
    try:
        while proc.poll() is None:
            try:
                proc.wait(timeout=fold_s)
            except subprocess.TimeoutExpired:
                pass
            export(run, n)
            if on_progress is not None:
                on_progress(run.store.counts())
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    return finish(run, t0)


def finish(run: Any, t0: float) -> Summary:
    """The array has ended: fold what it journaled, take back what it left, summarise."""
    sync(run)
    recall(run, dead=True)
    counts = run.store.counts()
    return Summary(run=str(run.path), total=sum(counts.values()), counts=counts,
                   attempts=counts["succeeded"] + counts["failed"], elapsed_s=time.time() - t0)

"""The array workers' loop: what ``pipefarm worker`` runs on each host of a job array.

:func:`work_loop` drives one :class:`~pipefarm.store.shared_fs.FsWorker` (the protocol's worker
side: claims, journals, splits) until nothing is left: it installs the drain signals (the
scheduler's walltime warning, a cancel), runs a heartbeat thread that touches the heartbeat
file and answers steal requests while a task runs, and runs each lease with
:class:`pipefarm.worker.LeaseRunner` unless given another runner. It lives with the workers,
not in ``store/``, because it runs tasks; the protocol it follows is
:mod:`pipefarm.store.shared_fs`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ...cache.serve import CachingRunner
from ...store.shared_fs import FsWorker, HeldBlock, WorkStats
from ...task import Finished, Lease, Resources
from ...worker import LeaseRunner


def work_loop(
    run_dir: str | os.PathLike[str],
    worker_id: str | None = None,
    runner: Callable[[Lease], Finished] | None = None,
    *,
    stop: threading.Event | None = None,
    drain_signals: Iterable[int] = (),
    lease_s: float | None = None,
    resources: Resources | None = None,
    idle_exit: float | None = None,
    poll: float = 0.2,
    max_poll: float = 2.0,
    fsync_interval: float = 0.5,
    on_block: Callable[[HeldBlock], None] | None = None,
    steal: bool = True,
    time_left: Callable[[], float | None] | None = None,
) -> WorkStats:
    """Claim blocks of ``run_dir`` and run them until nothing is left; return what was done.

    ``runner`` executes one lease (default: :class:`pipefarm.worker.LeaseRunner` over the
    specs this worker loads from ``fs/specs``). ``stop`` (an event) or any of ``drain_signals``
    (handlers installed only when called from the main thread, restored on return) makes the
    worker stop claiming, finish the running task, hand the rest of its block back and return.
    The loop returns when the exporter's wave is final and every block offered is done, or
    after ``idle_exit`` seconds with nothing to claim. A worker waits (polling every ``poll``
    to ``max_poll`` seconds) while other live workers hold blocks, so that it can take them over
    if their holders die, and meanwhile asks them for the tails of their blocks. A heartbeat
    thread touches the heartbeat file every ``lease_s / 4`` and answers steal requests on the
    held block every :data:`~pipefarm.store.shared_fs.STEAL_CHECK_S`. ``steal=False``: never ask (still answers).
    ``time_left`` gives the seconds left before this worker's walltime warning (see
    :mod:`.walltime`): blocks of tasks that asked for more time (``time_request``) are left
    for workers with more, and the loop returns (exit ``"no time"``) once all that is left
    needs more than it has.
    """
    stop = stop if stop is not None else threading.Event()
    w = FsWorker(run_dir, worker_id, lease_s=lease_s, resources=resources,
                 fsync_interval=fsync_interval, steal=steal, time_left=time_left)
    w.register()
    if runner is None:
        # a command killed by the signal that is stopping this worker (scheduler cancel,
        # preemption, walltime) is recorded lost, not as the task's failure
        runner = LeaseRunner(os.fspath(run_dir), w.id, w.specs, stopping=stop)
    # the result cache looks each lease up before it runs (a hit is a cached attempt)
    cached = CachingRunner(runner, w.specs)
    previous: dict[int, Any] = {}

    def drain(*_: Any) -> None:
        # Event.set takes a lock the interrupted main thread may hold: set it from a thread
        threading.Thread(target=stop.set, daemon=True).start()

    if threading.current_thread() is threading.main_thread():
        for sig in drain_signals:
            previous[sig] = signal.signal(sig, drain)
    hb_stop = threading.Event()

    def heartbeat() -> None:
        beat_every = max(0.02, w.lease_s / 4)
        period = max(0.02, w.check_s)
        next_beat = time.monotonic() + beat_every
        while not hb_stop.wait(period):
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + beat_every
                with contextlib.suppress(OSError):
                    w.beat()
            try:
                w.answer_steal(stop)
            except Exception:  # noqa: BLE001 - an unanswered request is withdrawn by its
                pass  # thief; this thread must go on beating whatever happens here

    hb = threading.Thread(target=heartbeat, name=f"pipefarm-hb-{w.id}", daemon=True)
    hb.start()
    try:
        idle_since: float | None = None
        delay = poll
        while not stop.is_set():
            blk = w.claim_block()
            if blk is not None:
                idle_since, delay = None, poll
                if on_block is not None:
                    on_block(blk)
                w.run_block(blk, cached, stop)
                continue
            if w.asking:
                stop.wait(poll)  # an answer comes within STEAL_CHECK_S: look often
                continue
            if w.finished():
                w.stats.exit = "finished"
                break
            if w.out_of_time():  # it will only have less: waiting would hold the allocation
                w.stats.exit = "no time"
                break
            mono = time.monotonic()
            idle_since = mono if idle_since is None else idle_since
            if idle_exit is not None and mono - idle_since >= idle_exit:
                w.stats.exit = "idle"
                break
            stop.wait(delay)
            delay = min(max_poll, delay * 1.5)
        else:
            w.stats.exit = "stopped"
        if w.asking:  # leaving: nobody will run what an answer would give us
            w.withdraw()
    finally:
        hb_stop.set()
        hb.join()
        cached.close()
        w.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return w.stats

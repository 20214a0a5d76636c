"""The sequential backend: every task in the calling process, one after another.

The reference implementation, with the same states, retries and records as the others, and the
one to use under a debugger. A Python task's timeout is enforced with ``SIGALRM`` when running
in the main thread; a task stuck inside a C call cannot be interrupted here.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import threading
import time
from typing import Any

from ..cache.serve import CachingRunner
from ..execute.py import TaskInterrupt
from ..states import Outcome
from ..store.base import Store
from ..task import Finished, Lease
from ..worker import LeaseRunner
from .base import Hooks, Summary

#: setitimer() overflows time_t a little beyond 1e10 s here; a timeout of over 31 years is
#: no timeout in practice.
_LONGEST_TIMER_S = 1e9


class _Timeout(TaskInterrupt):
    """Raised inside a task whose time is up (BaseException: the task must not catch it)."""


class SequentialBackend:
    """Run tasks one at a time in this process."""

    name = "sequential"

    def __init__(self, workers: int | None = None) -> None:
        del workers  # always one

    def execute(self, store: Store, hooks: Hooks | None = None) -> Summary:
        """Run every claimable task of ``store``, one at a time, until none is left or
        ``hooks.stop`` is set (then the summary says ``interrupted``)."""
        hooks = hooks or Hooks()
        run_dir, on_progress, stop = hooks.run_dir, hooks.on_progress, hooks.stop
        t0 = time.time()
        wid = f"{socket.gethostname().split('.')[0]}-{os.getpid()}-seq"
        store.register_worker(wid, socket.gethostname(), os.getpid())
        # the result cache looks each lease up before it runs (a hit is a cached attempt)
        inner = LeaseRunner(run_dir, wid, {})
        runner = CachingRunner(inner, inner.specs)
        attempts = 0
        interrupted = False
        feed = hooks.feed
        feeding = feed is not None
        main = threading.current_thread() is threading.main_thread()
        while True:
            if stop is not None and stop.is_set():
                interrupted = True
                break
            if feed is not None and feeding:
                feeding = bool(feed(0.0))
            leases = store.claim(wid, 1)
            if not leases:
                if feed is not None and feeding:  # idle: block on the feed a little
                    feeding = bool(feed(0.05))
                    continue
                nxt = store.next_ready_at()
                if nxt is None:
                    break
                time.sleep(min(max(nxt - time.time(), 0.0), 0.5))
                continue
            lease = leases[0]
            spec = store.spec(lease.spec)
            runner.specs.setdefault(lease.spec, spec)
            store.start([(lease.task, lease.token)])
            if hooks.on_dispatch is not None:
                hooks.on_dispatch(leases)
            try:
                finished = self._run_one(runner, lease,
                                         spec.timeout if main and spec.kind == "py" else None)
            except KeyboardInterrupt:  # Ctrl-C: the task was stopped, not its doing: no retry spent
                store.release(wid, [(lease.task, lease.token)])
                raise
            store.finish(wid, [finished])
            attempts += 1
            if hooks.on_finished is not None:
                hooks.on_finished([], [finished])
            if on_progress is not None:
                on_progress(store.counts())
        runner.close()
        counts = store.counts()
        return Summary(run=run_dir, total=sum(counts.values()), counts=counts, attempts=attempts,
                       elapsed_s=time.time() - t0, interrupted=interrupted)

    @staticmethod
    def _run_one(runner: CachingRunner, lease: Lease, timeout: float | None) -> Finished:
        if timeout is None or not math.isfinite(timeout) or timeout > _LONGEST_TIMER_S:
            return runner(lease)

        def on_alarm(signum: int, frame: Any) -> None:
            raise _Timeout()

        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        started = time.time()
        try:
            return runner(lease)
        except _Timeout:
            return Finished(lease.task, lease.token, int(Outcome.TIMED_OUT), started, time.time(),
                            error=f"timed out after {timeout:g} s", attempt=lease.attempt)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)

"""``pf.Executor``: a :class:`concurrent.futures.Executor` on pipefarm's local engine.

Tasks go through the same store and local backend as a durable run. By default the store lives
in memory (nothing is left behind, like ``ProcessPoolExecutor``); pass ``run_dir`` to keep
every task and result on disk. Workers start as calls arrive, up to ``max_workers``. If the
engine stops (its workers cannot start, ...), every pending call fails with
:class:`BrokenExecutor` naming the cause, and no new call is accepted.
"""

from __future__ import annotations

import concurrent.futures as cf
import pickle
import queue
import threading
from collections.abc import Callable
from typing import Any

from .errors import PipefarmError, TaskFailed
from .states import Outcome
from .task import PY, Finished, Spec, dumps_args


class BrokenExecutor(cf.BrokenExecutor, PipefarmError):
    """The executor's engine stopped (for example, its worker processes cannot start): pending
    calls fail with this, and it accepts no new ones."""


def _fail(fut: cf.Future, exc: BaseException) -> None:
    """Fail ``fut`` with ``exc`` unless it is done or was cancelled."""
    try:
        if fut.done() or (not fut.running() and not fut.set_running_or_notify_cancel()):
            return
        fut.set_exception(exc)
    except (RuntimeError, cf.InvalidStateError):  # finished or cancelled meanwhile
        pass


class _Future(cf.Future):
    """A future that tells its executor when it is cancelled before it ran."""

    def __init__(self, cancels: queue.SimpleQueue[int]) -> None:
        super().__init__()
        self._pf_cancels = cancels
        self._pf_task: int | None = None

    def cancel(self) -> bool:
        ok = super().cancel()
        if ok and self._pf_task is not None:
            self._pf_cancels.put(self._pf_task)  # the engine cancels the queued task
        return ok


class Executor(cf.Executor):
    """Run callables in ``max_workers`` processes (default: the CPU count).

    ``timeout`` (seconds) applies to each call: an overrunning call fails its future with
    :class:`pipefarm.TaskFailed` and its worker process is replaced.
    """

    def __init__(self, max_workers: int | None = None, *, run_dir: str | None = None,
                 timeout: float | None = None) -> None:
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        self._max_workers = max_workers
        self._run_dir = run_dir
        self._timeout = timeout
        self._inbox: queue.SimpleQueue[tuple[cf.Future, Callable, tuple, dict] | None] = queue.SimpleQueue()
        self._futures: dict[int, cf.Future] = {}
        self._shutdown = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._cancels: queue.SimpleQueue[int] = queue.SimpleQueue()

    # --- the concurrent.futures API ---------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._error is not None:
                raise BrokenExecutor(f"{self._error}; no new calls are accepted")
            fut: cf.Future = _Future(self._cancels)
            self._inbox.put((fut, fn, args, kwargs))
            if self._thread is None:
                self._thread = threading.Thread(target=self._engine, name="pipefarm-executor",
                                                daemon=True)
                self._thread.start()
            return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                for fut in self._take_queued():
                    fut.cancel()
                for fut in list(self._futures.values()):
                    fut.cancel()  # only those no worker has started
            self._inbox.put(None)
        if wait and self._thread is not None:
            self._thread.join()

    # --- the engine thread -----------------------------------------------------------------------
    def _engine(self) -> None:
        from .backends.base import Hooks
        from .backends.local import LocalBackend
        from .store.sqlite import SQLiteStore

        store = SQLiteStore(self._run_dir or ":memory:", synchronous="NORMAL")
        specs: dict[int, tuple[int, Callable]] = {}
        closing = False

        def spec_for(fn: Callable) -> int:
            hit = specs.get(id(fn))
            if hit is not None and hit[1] is fn:
                return hit[0]
            import cloudpickle

            payload = cloudpickle.dumps(fn, protocol=5)
            # every outcome is final: no retries, a dead worker fails the call
            sid = store.add_spec(Spec(kind=PY, payload=payload, timeout=self._timeout,
                                      max_attempts=1, max_lost=1))
            specs[id(fn)] = (sid, fn)
            return sid

        def feed(wait_s: float = 0.0) -> bool:
            nonlocal closing
            batch: list[tuple[cf.Future, Callable, tuple, dict]] = []
            while True:
                try:
                    item = self._inbox.get(timeout=wait_s) if wait_s else self._inbox.get_nowait()
                except queue.Empty:
                    break
                wait_s = 0.0
                if item is None:
                    closing = True
                    continue
                batch.append(item)
            for fut, fn, args, kwargs in batch:
                if fut.cancelled():
                    continue
                try:
                    sid = spec_for(fn)
                    tid = store.add_tasks(sid, [dumps_args(args, kwargs)])[0]
                except BaseException as exc:  # unpicklable function or arguments
                    fut.set_running_or_notify_cancel()
                    fut.set_exception(exc)
                    continue
                self._futures[tid] = fut
                fut._pf_task = tid
                if fut.cancelled():  # cancelled while it was being added
                    self._cancels.put(tid)
            cancelled = []
            while True:
                try:
                    cancelled.append(self._cancels.get_nowait())
                except queue.Empty:
                    break
            if cancelled:
                store.cancel(cancelled)
                for tid in cancelled:
                    self._futures.pop(tid, None)
            return not (closing and self._inbox.empty())

        def on_dispatch(leases: list) -> None:
            for lease in leases:
                fut = self._futures.get(lease.task)
                if fut is not None and not fut.running():
                    fut.set_running_or_notify_cancel()

        def on_finished(ok: list[tuple], others: list[Finished]) -> None:
            for row in ok:
                fut = self._futures.pop(row[0], None)
                if fut is not None and not fut.done():
                    try:
                        fut.set_result(pickle.loads(row[5]) if row[5] is not None else None)
                    except BaseException as exc:  # a result that cannot be unpickled here
                        fut.set_exception(exc)
            for f in others:
                fut = self._futures.pop(f.task, None)
                if fut is None or fut.done():
                    continue
                if f.outcome == Outcome.SUCCEEDED:
                    try:
                        fut.set_result(pickle.loads(f.result) if f.result is not None else None)
                    except BaseException as exc:
                        fut.set_exception(exc)
                    continue
                cause = None
                if f.result is not None:
                    try:
                        cause = pickle.loads(f.result)
                    except BaseException:
                        cause = None
                if isinstance(cause, BaseException):
                    fut.set_exception(cause)
                else:
                    fut.set_exception(TaskFailed(f.task, Outcome(f.outcome).label, f.error))
            if self._run_dir is None:
                store.forget([r[0] for r in ok] + [f.task for f in others])

        try:
            LocalBackend(self._max_workers, capture_output=False).execute(
                store, Hooks(run_dir=self._run_dir, feed=feed, on_finished=on_finished,
                             on_dispatch=on_dispatch, stop=self._stop))
        except BaseException as exc:
            self._break(BrokenExecutor(f"the executor's engine stopped: {exc}"), exc)
        else:  # every call fed was answered; any left (none expected) must not wait forever
            self._break(BrokenExecutor("the executor's engine stopped before this call ran"))
        finally:
            store.close()

    def _take_queued(self) -> list[cf.Future]:
        """Empty the inbox: the futures of calls the engine has not taken yet."""
        futures = []
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return futures
            if item is not None:
                futures.append(item[0])

    def _break(self, error: BrokenExecutor, cause: BaseException | None = None) -> None:
        """Fail every call not answered yet with ``error``; refuse new ones (when ``cause``)."""
        error.__cause__ = cause
        with self._lock:  # no submit slips in between
            if cause is not None:
                self._error = error
            pending = list(self._futures.values())
            self._futures.clear()
            pending += self._take_queued()
        for fut in pending:
            _fail(fut, error)

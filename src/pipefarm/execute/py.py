"""Run one Python task in the current process and describe how it ended."""

from __future__ import annotations

import copyreg
import io
import pickle
import time
import traceback
from collections.abc import Callable
from typing import Any

from ..states import Outcome
from ..task import Finished, Lease, loads_args
from .memory import METER, DataLimit, format_memory


class TaskInterrupt(BaseException):
    """Raised into a running task to stop it (a timeout): never recorded as its failure."""


def load_callable(payload: bytes) -> Callable[..., Any]:
    """The callable stored in a spec's payload (cloudpickle)."""
    import cloudpickle  # noqa: F401 - registers what cloudpickle'd payloads need

    return pickle.loads(payload)


def dump_value(value: Any) -> bytes:
    """Serialise a result or an exception: plain pickle, cloudpickle when needed."""
    try:
        return pickle.dumps(value, protocol=5)
    except Exception:
        import cloudpickle

        return cloudpickle.dumps(value, protocol=5)


def dump_exception(exc: BaseException) -> bytes:
    """Serialise a task's exception by its own ``__reduce__``.

    Reducers registered in ``copyreg`` for exception classes are left out: tblib's (which
    ``distributed`` installs for every exception class on import, in the worker forked from a
    process that imported it) rebuild ``SystemExit('msg')`` with ``code`` None.
    """
    table = {cls: reducer for cls, reducer in copyreg.dispatch_table.items()
             if not (isinstance(cls, type) and issubclass(cls, BaseException))}
    buf = io.BytesIO()
    try:
        pickler = pickle.Pickler(buf, protocol=5)
        pickler.dispatch_table = table
        pickler.dump(exc)
    except Exception:
        return dump_value(exc)
    return buf.getvalue()


def run_python(fn: Callable[..., Any], lease: Lease, memory: int | None = None) -> Finished:
    """Call ``fn`` with the lease's arguments; the result or the exception, pickled.

    ``memory``: the task's limit in bytes (see :class:`~pipefarm.execute.memory.DataLimit`);
    a ``MemoryError`` under it ends the attempt ``oom``. Every attempt carries its peak.
    """
    if METER.stale:
        METER.begin()
    started = time.time()
    try:
        args, kwargs = loads_args(lease.args)
        if memory is None:
            value = fn(*args, **kwargs)
        else:
            with DataLimit(memory):
                value = fn(*args, **kwargs)
    except (KeyboardInterrupt, TaskInterrupt):
        raise  # Ctrl-C of the caller (sequential backend) or a timeout: not the task's doing
    except BaseException as exc:  # noqa: BLE001 - a task's failure is data, not our crash
        # SystemExit included: sys.exit() in a task ends the task, not its worker (as
        # ProcessPoolExecutor does, the caller gets the SystemExit back)
        ended = time.time()
        oom = memory is not None and isinstance(exc, MemoryError)
        error = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            blob: bytes | None = dump_exception(exc)
        except Exception:
            blob = None  # an exception that cannot travel: its traceback text still does
    else:
        ended = time.time()
        peak = METER.peak(ended - started)
        try:
            blob = dump_value(value)
        except Exception as exc:
            return Finished(
                lease.task, lease.token, int(Outcome.FAILED), started, ended, None,
                error=f"the task's result cannot be pickled: {type(exc).__name__}: {exc}",
                attempt=lease.attempt, peak_memory=peak,
            )
        return Finished(lease.task, lease.token, int(Outcome.SUCCEEDED), started, ended, blob,
                        attempt=lease.attempt, peak_memory=peak)
    peak = METER.peak(ended - started)
    if oom:
        error = (f"went past its memory limit of {format_memory(memory or 0)} (MemoryError;"
                 f" worker's peak {format_memory(peak)})\n{error}")
    return Finished(
        lease.task, lease.token, int(Outcome.OOM if oom else Outcome.FAILED), started, ended,
        blob, error=error, attempt=lease.attempt, peak_memory=peak,
    )

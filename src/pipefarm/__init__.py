"""pipefarm: run large numbers of tasks in parallel and never lose a finished result.

    import pipefarm as pf
    run = pf.Run.create("runs/sweep")
    run.map(simulate, params, retries=2, timeout=600)
    run.execute(workers=8)

Names are imported lazily so that ``import pipefarm`` stays fast.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs start-up time

__version__ = "0.1.0"

_LAZY = {
    "Run": ("pipefarm.run", "Run"),
    "Executor": ("pipefarm.executor", "Executor"),
    "BrokenExecutor": ("pipefarm.executor", "BrokenExecutor"),
    "Summary": ("pipefarm.backends.base", "Summary"),
    "TaskFailed": ("pipefarm.errors", "TaskFailed"),
    "TaskNotFinished": ("pipefarm.errors", "TaskNotFinished"),
    "SubmissionError": ("pipefarm.errors", "SubmissionError"),
    "RunLocked": ("pipefarm.errors", "RunLocked"),
    "UnsafeRun": ("pipefarm.errors", "UnsafeRun"),
    "PipefarmError": ("pipefarm.errors", "PipefarmError"),
    "DiskFull": ("pipefarm.store.sqlite", "DiskFull"),
    "State": ("pipefarm.states", "State"),
    "Outcome": ("pipefarm.states", "Outcome"),
    "TaskOptions": ("pipefarm.task", "TaskOptions"),
    "backends": ("pipefarm.backends", None),
    "cache": ("pipefarm.cache", None),
    "task": ("pipefarm.task", None),  # the module, which called is the cache's decorator
    "checkpoint": ("pipefarm.execute.checkpoint", None),
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from . import backends, cache  # noqa: F401
    from .backends.base import Summary  # noqa: F401
    from .cache.key import task  # noqa: F401
    from .errors import (  # noqa: F401  # noqa: F401
        PipefarmError,
        RunLocked,
        SubmissionError,
        TaskFailed,
        TaskNotFinished,
        UnsafeRun,
    )
    from .execute import checkpoint  # noqa: F401
    from .executor import BrokenExecutor, Executor  # noqa: F401
    from .run import Run  # noqa: F401
    from .states import Outcome, State  # noqa: F401
    from .store.sqlite import DiskFull  # noqa: F401
    from .task import TaskOptions  # noqa: F401


def __getattr__(name: str) -> object:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'pipefarm' has no attribute {name!r}") from None
    import importlib

    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value

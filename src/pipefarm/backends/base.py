"""The backend contract: :class:`Backend`, the :class:`Hooks` a caller hands it, the
:class:`Summary` it answers with, and the registry that finds a backend by name.

Every backend -- ``local``, ``sequential`` and those to come -- is one call,
``execute(store, hooks) -> Summary``, so callers (``Run.execute``, the Executor, the CLI, the
benchmarks) never need to know which engine ran the tasks. Backends are found by name through the
``pipefarm.backends`` entry-point group, so a site adds its own without touching pipefarm; the
built-in ones are registered there too, and :data:`BUILT_IN` finds them in a source checkout that
was never installed.

The ``array`` backend is not registered: it does not fit this contract today. Its workers are
batch jobs on other hosts that never talk to the caller; a run is prepared, submitted, and
waited on (or left to finish after the submitting process exits) as three separate steps,
possibly from three different commands, so there is no single ``execute`` call to return a
:class:`Summary` from.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import msgspec

if TYPE_CHECKING:
    from ..store.base import Store
    from ..task import Finished, Lease

#: The entry-point group backends register under (``[project.entry-points."pipefarm.backends"]``).
ENTRY_POINT_GROUP = "pipefarm.backends"

#: The backends that ship with pipefarm, as ``module:attribute`` like an entry point's value:
#: found even when pipefarm runs from a source checkout that was never installed.
BUILT_IN = {
    "local": "pipefarm.backends.local:LocalBackend",
    "sequential": "pipefarm.backends.sequential:SequentialBackend",
    "dask": "pipefarm.backends.dask:DaskBackend",
    "mpi": "pipefarm.backends.mpi:MPIBackend",
    "ray": "pipefarm.backends.ray:RayBackend",
}

ProgressFn = Callable[[dict[str, int]], None]


class Summary(msgspec.Struct):
    """What one ``execute`` call did."""

    run: str | None
    total: int
    counts: dict[str, int]
    attempts: int  # attempts that ended during this call
    elapsed_s: float
    interrupted: bool = False
    #: Why a ``halt`` policy stopped the run (``None``: it did not), e.g.
    #: ``"3 task(s) failed (halt soon,fail=3)"``.
    halted: str | None = None

    @property
    def succeeded(self) -> int:
        return self.counts.get("succeeded", 0)

    @property
    def failed(self) -> int:
        return self.counts.get("failed", 0)

    @property
    def throughput(self) -> float:
        return self.attempts / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        """Every task succeeded."""
        return self.succeeded == self.total

    def __str__(self) -> str:
        c = self.counts
        parts = [f"{c.get('succeeded', 0):,} succeeded"]
        for k in ("failed", "skipped", "cancelled", "ready", "blocked"):
            if c.get(k):
                parts.append(f"{c[k]:,} {k}")
        head = "interrupted" if self.interrupted else "halted" if self.halted else "done"
        return (
            f"{head}: {self.total:,} tasks ({', '.join(parts)}); {self.attempts:,} attempts in"
            f" {self.elapsed_s:.2f} s ({self.throughput:,.0f}/s)"
            + (f"; run: {self.run}" if self.run else "")
        )


@dataclass(frozen=True)
class Hooks:
    """What a caller gives a backend besides the store: where the run lives and the callbacks
    through which it follows (and feeds, and stops) the execution. Every field is optional; a
    backend ignores the callbacks it has no occasion to call (``sequential`` never dispatches a
    batch, so it never calls ``on_dispatch``).
    """

    #: The run directory (worker logs, outputs), or None for a run kept in memory.
    run_dir: str | None = None
    #: Called with the counts by state (plus ``"running"``) as they change, at most about once
    #: per loop turn.
    on_progress: ProgressFn | None = None
    #: Called with the leases of each batch as it is sent to a worker.
    on_dispatch: Callable[[list[Lease]], None] | None = None
    #: Called with every committed outcome: plain successes as
    #: :data:`~pipefarm.task.SuccessRow` rows, the rest as :class:`~pipefarm.task.Finished`.
    on_finished: Callable[[list[tuple], list[Finished]], None] | None = None
    #: ``feed(wait_s)`` adds tasks to the store, waiting up to ``wait_s`` for one when the
    #: backend is idle; it returns False once no more will come (the Executor's).
    feed: Callable[[float], bool] | None = None
    #: Set to end the execution as Ctrl-C does (running tasks released, not charged).
    stop: threading.Event | None = None


@runtime_checkable
class Backend(Protocol):
    """An engine that runs a store's tasks: one call, the same answer for every engine."""

    def execute(self, store: Store, hooks: Hooks) -> Summary:
        """Run every claimable task of ``store`` until none is left (or ``hooks.stop``)."""
        ...


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def installed() -> list[str]:
    """The names of the backends this installation can make, sorted."""
    return sorted(set(BUILT_IN) | set(_entry_points()))


def backend_class(name: str) -> Callable[..., Backend]:
    """The factory registered as ``name``: the built-in one, else the entry point's.

    Built-in names are resolved without reading the installed distributions' metadata (that
    read costs milliseconds on every ``execute``); raises ValueError naming the installed
    backends when ``name`` is none of them.
    """
    target = BUILT_IN.get(name)
    if target is not None:
        from importlib import import_module

        module, _, attr = target.partition(":")
        return getattr(import_module(module), attr)
    ep = _entry_points().get(name)
    if ep is None:
        raise ValueError(f"unknown backend {name!r}; installed: {', '.join(installed())}")
    return ep.load()


def make_backend(backend: str | Backend, workers: int | None = None, **options: Any) -> Backend:
    """A backend object from its name (built with ``workers`` and ``options``), or ``backend``
    itself if it is one already."""
    if not isinstance(backend, str):
        return backend
    return backend_class(backend)(workers, **options)

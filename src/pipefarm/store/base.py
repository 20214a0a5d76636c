"""The lease protocol every store implements (DESIGN.md, "The two stores, one contract").

Times are seconds since the epoch as floats. Every method that depends on the clock takes an
optional ``now`` so that tests can drive a store with a simulated clock.
"""

from __future__ import annotations

import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import msgspec

from ..states import Outcome
from ..task import Finished, Lease, Resources, Spec

#: Seconds a lease lives without a heartbeat from its worker.
DEFAULT_LEASE_S = 60.0

#: The worker id that holds the leases the default coordinator methods take (see
#: :meth:`Store.lease_ready`); a valid id for every store (journals are named after it).
COORDINATOR = "coordinator"


def check_private(path: str | os.PathLike[str], *, warn: bool = False) -> bool:
    """Refuse a run directory that another user could write (it may hold planted pickles).

    With ``warn``: say so in an :class:`~pipefarm.errors.UnsafeRunWarning` instead and return
    True (the caller promises to unpickle nothing from it). Returns False for a private
    directory. Never changes the directory's mode: that is the owner's call.
    """
    from ..errors import UnsafeRun, UnsafeRunWarning

    st = os.stat(path)
    if not (st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            or (hasattr(os, "getuid") and st.st_uid not in (os.getuid(), 0))):
        return False
    mode = stat.filemode(st.st_mode)
    if warn:
        import warnings

        warnings.warn(f"{path} can be written by other users (mode {mode}); reading it"
                      f" anyway. Fix with: chmod go-w {path}", UnsafeRunWarning, stacklevel=3)
        return True
    raise UnsafeRun(f"{path} can be written by other users (mode {mode}): pipefarm will not"
                    f" unpickle from it or write to it. Fix with: chmod go-w {path}")


class TaskRow(msgspec.Struct):
    """One task as the query side reports it."""

    id: int
    key: str | None
    state: str
    attempts: int
    failures: int
    lost: int
    priority: int
    cost: float
    worker: str | None
    started_at: float | None
    ended_at: float | None
    exit_code: int | None
    error: str | None
    note: str | None
    spec: int


class TaskIds(list):
    """The ids of one keyed submission, in input order, when some keys were in the run already.

    Those give back the existing task's id; ``added`` is the range of the tasks this
    submission added (possibly empty). A submission that adds every task returns a plain
    ``range`` instead.
    """

    __slots__ = ("added",)
    added: range

    @property
    def existing(self) -> int:
        """How many of the ids belong to tasks that were there before (same key)."""
        return len(self) - len(self.added)


class AttemptRow(msgspec.Struct):
    """One attempt of a task."""

    task: int
    attempt: int
    worker: str | None
    token: int | None
    outcome: str
    started_at: float | None
    ended_at: float | None
    exit_code: int | None
    error: str | None
    note: str | None
    peak_memory: int | None = None  # resident bytes at the attempt's peak (None: not measured)


class Store(ABC):
    """Durable task state with leases. See DESIGN.md for the contract."""

    lease_s: float = DEFAULT_LEASE_S

    # --- submission -----------------------------------------------------------------------------
    @abstractmethod
    def add_spec(self, spec: Spec) -> int:
        """Record a spec (callable or command template plus policies); return its id."""

    @abstractmethod
    def spec(self, spec_id: int) -> Spec:
        """The spec with this id."""

    @abstractmethod
    def add_tasks(
        self,
        spec_id: int,
        args: Iterable[bytes | None],
        *,
        keys: Iterable[str | None] | None = None,
        priority: int = 0,
        cost: float = 0.0,
        after: Sequence[int] = (),
    ) -> Sequence[int]:
        """Add one task per element of ``args`` (serialised arguments); return their ids.

        Ids are dense and in input order: a ``range`` when every task is new. Keys are unique
        in a run: a key that is already there adds nothing and gives back that task's id (the
        result is then a :class:`TaskIds` list); a key repeated within ``keys`` raises
        :class:`ValueError` naming it, and nothing is written. Tasks with unfinished dependencies in ``after`` start ``blocked``; if one of them has
        already ended unsuccessfully they start ``skipped``. Unknown ids in ``after`` raise
        :class:`ValueError` and nothing is written.
        """

    # --- the lease protocol ---------------------------------------------------------------------
    @abstractmethod
    def register_worker(self, worker: str, host: str, pid: int, now: float | None = None) -> None:
        """Announce a worker (its first heartbeat)."""

    @abstractmethod
    def claim(
        self, worker: str, n: int, resources: Resources | None = None, now: float | None = None
    ) -> list[Lease]:
        """Lease up to ``n`` ready tasks to ``worker``: by priority, then cost, then id.

        Tasks in backoff (``ready_at`` in the future) are not handed out. ``resources`` limits
        the claim to tasks that fit in it.
        """

    @abstractmethod
    def heartbeat(self, worker: str, now: float | None = None) -> None:
        """Extend every lease ``worker`` holds (one write per worker)."""

    @abstractmethod
    def start(self, leases: Iterable[tuple[int, int]], now: float | None = None) -> int:
        """Mark leased tasks running; ``leases`` are ``(task, token)``. Returns how many moved."""

    @abstractmethod
    def finish(self, worker: str, outcomes: Iterable[Finished], now: float | None = None) -> int:
        """Commit attempt endings; only where the token is still the task's current token.

        An outcome with a superseded token is recorded as a ``stale`` attempt and changes
        nothing else. Returns the number of outcomes that took effect.
        """

    @abstractmethod
    def release(self, worker: str, leases: Iterable[tuple[int, int]], now: float | None = None) -> int:
        """Hand leases back unstarted, or stopped by a known cause: no budget is spent."""

    @abstractmethod
    def reap(self, now: float | None = None, *, workers: Iterable[str] | None = None) -> int:
        """Turn expired leases into ``lost`` attempts; retry or fail by the lost budget.

        A lease expires when its worker's last heartbeat is older than ``lease_s``. With
        ``workers`` given, those workers' leases are reaped at once, whatever their heartbeat
        (used when a worker is known to be dead). Claimed tasks that never started are released
        rather than lost. Returns the number of leases reaped.
        """

    # --- the coordinator's leases ----------------------------------------------------------------
    # The local backend's coordinator hands tasks to its own worker processes. A store may keep
    # those leases in the coordinator's memory (SQLiteStore: a task costs one write when it ends,
    # not one more when it is leased); the defaults below take real leases through the protocol
    # above, held by COORDINATOR, and are correct for any store. Either way tokens guard every
    # commit, exactly as in finish().

    def lease_ready(
        self,
        n: int,
        inflight: set[int],
        cursor: tuple[int, float, int] | None = None,
        resources: Resources | None = None,
        now: float | None = None,
    ) -> tuple[list[Lease], tuple[int, float, int] | None]:
        """Lease up to ``n`` ready tasks to the coordinator, in claim order (priority, then
        cost, then id; tasks in backoff and, with ``resources``, tasks that do not fit are not
        handed out). Returns the leases and a cursor to pass to the next call.

        ``inflight`` holds the ids the caller leases already: never handed out again. ``cursor``
        is a hint only (where the caller's last search ended; None after anything became ready
        again): a store may resume its search there, and None is always a correct value. Each
        lease carries a fresh token and the attempt number the attempt will have. The caller
        ends every lease with :meth:`finish_leased`; one it drops unstarted is ready again at
        once where leases live in memory, and after :meth:`reap` (unstarted claims are released,
        no budget spent) where they are real leases, as in this default.
        """
        leases = self.claim(COORDINATOR, n, resources, now)
        taken = [lz for lz in leases if lz.task in inflight]
        if taken:  # cannot happen with real leases (held ids are not ready); hand back if it does
            self.release(COORDINATOR, [(lz.task, lz.token) for lz in taken], now)
            leases = [lz for lz in leases if lz.task not in inflight]
        return leases, None

    def start_leased(self, worker: str, leases: Iterable[Lease], now: float | None = None) -> int:
        """Record that coordinator leases have started running on ``worker``; returns how many
        moved to ``running``. A lease whose token is no longer the task's (cancelled, reaped,
        committed) moves nothing."""
        pairs = [(lz.task, lz.token) for lz in leases]
        if not pairs:
            return 0
        self.heartbeat(COORDINATOR, now)
        return self.start(pairs, now)

    def finish_leased(
        self,
        worker: str,
        succeeded: Sequence[Sequence[Any]],
        others: Sequence[Finished] = (),
        now: float | None = None,
    ) -> int:
        """Commit the outcomes of coordinator leases (started or not); returns how many took
        effect.

        ``succeeded`` rows are ``(task, token, attempt, started_at, ended_at, result, worker)``
        (:data:`~pipefarm.task.SuccessRow`) of successes with a small result and nothing else to
        record; ``others`` are every other outcome, committed as :meth:`finish` commits them
        (retry or fail by the budget, release without cost). Only a lease whose token is still
        the task's current one takes effect; any other outcome (the task was cancelled, reaped,
        or already committed) becomes a ``stale`` attempt and changes nothing else.
        """
        by_worker: dict[str, list[Finished]] = {}
        for r in succeeded:
            by_worker.setdefault(r[6] or worker, []).append(
                Finished(r[0], r[1], int(Outcome.SUCCEEDED), r[3], r[4], r[5], attempt=r[2],
                         peak_memory=r[7] if len(r) > 7 else None))
        if others:
            by_worker.setdefault(worker, []).extend(others)
        if not by_worker:
            return 0
        self.heartbeat(COORDINATOR, now)
        return sum(self.finish(w, outs, now) for w, outs in by_worker.items())

    def has_deps(self) -> bool:
        """Whether any task of the run has dependencies: when False, no commit can make another
        task ready, so a coordinator may skip looking for newly released tasks. True is always
        a correct answer (this default)."""
        return True

    def next_ready_at(self) -> float | None:
        """When the earliest task in backoff becomes claimable (seconds since the epoch), or
        None when no task waits in backoff; lets an idle coordinator sleep until then. None is
        a correct answer where a store cannot tell (this default): the caller polls."""
        return None

    @contextmanager
    def transaction(self) -> Iterator[Store]:
        """Group several write methods into one transaction where the store can (all or
        nothing); this default runs them one by one."""
        yield self

    def drop_views_index(self) -> None:
        """Drop the index a view may have built on an idle run (see
        :func:`~pipefarm.store.sqlite.schema.build_views_index`), before the run executes, so
        that no commit pays for it; this default has none."""
        return None

    # --- user actions ---------------------------------------------------------------------------
    @abstractmethod
    def cancel(self, ids: Iterable[int] | None = None) -> int:
        """Cancel non-terminal tasks (all when ``ids`` is None); dependents are skipped."""

    @abstractmethod
    def retry(self, ids: Iterable[int] | None = None, *, failed_only: bool = True) -> int:
        """Give terminal tasks a new attempt budget; return how many were revived.

        By default the failed tasks; with ``failed_only=False`` the failed, cancelled and
        skipped ones; with ``ids``, exactly those (any terminal state). Tasks skipped because
        of a revived task return to ``blocked`` (or ``ready`` when nothing is left pending).
        """

    # --- the query side -------------------------------------------------------------------------
    @abstractmethod
    def counts(self) -> dict[str, int]:
        """Number of tasks in each state, every state present (zeros included)."""

    @abstractmethod
    def tasks(
        self, state: str | None = None, ids: Iterable[int] | None = None, limit: int | None = None
    ) -> list[TaskRow]:
        """Tasks, optionally filtered by state label or ids, in id order."""

    @abstractmethod
    def attempts(self, task: int) -> list[AttemptRow]:
        """Every attempt of ``task``, oldest first, the current one included."""

    @abstractmethod
    def result(self, task: int) -> tuple[str, bytes | None, str | None]:
        """``(state, result blob, error)`` of one task."""

    @abstractmethod
    def results(self) -> Iterable[tuple[Any, ...]]:
        """Rows of every task for export (see ``Run.results``)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release files and connections."""

"""The lease protocol every store implements (DESIGN.md, "The two stores, one contract").

Times are seconds since the epoch as floats. Every method that depends on the clock takes an
optional ``now`` so that tests can drive a store with a simulated clock.
"""

from __future__ import annotations

import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from ..task import Finished, Lease, Resources, Spec

#: Seconds a lease lives without a heartbeat from its worker.
DEFAULT_LEASE_S = 60.0



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

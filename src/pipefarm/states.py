"""The task state machine: the one place that says which transitions are legal.

Stores change many tasks per statement, so besides checking single transitions this module
answers "from which states may a task move to X" (:func:`sources`), and stores put that set
into their ``WHERE`` clauses. A transition that is not listed here cannot happen anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import IntEnum


class State(IntEnum):
    """Where a task stands. The integer values are stored on disk: never renumber."""

    BLOCKED = 0
    READY = 1
    CLAIMED = 2
    RUNNING = 3
    SUCCEEDED = 4
    FAILED = 5
    SKIPPED = 6
    CANCELLED = 7

    @property
    def label(self) -> str:
        return self.name.lower()


class Outcome(IntEnum):
    """How one attempt ended. Stored on disk: never renumber."""

    SUCCEEDED = 0
    FAILED = 1
    TIMED_OUT = 2
    LOST = 3  # the worker vanished (killed, host lost, lease expired)
    RELEASED = 4  # handed back unstarted, or stopped by a known cause (drain, walltime)
    STALE = 5  # a result from a lease that had been taken over; never the task's result
    CACHED = 6  # a success taken from the result cache: the task did not run again
    OOM = 7  # stopped for going past its memory limit: a failure, retried by policy

    @property
    def label(self) -> str:
        return self.name.lower()


#: outcomes that end a task successfully (its result is the attempt's result)
SUCCESSFUL = frozenset({Outcome.SUCCEEDED, Outcome.CACHED})
#: outcomes that are the task's own failure: they spend its retry budget
SPENDS_RETRY = frozenset({Outcome.FAILED, Outcome.TIMED_OUT, Outcome.OOM})

TERMINAL = frozenset({State.SUCCEEDED, State.FAILED, State.SKIPPED, State.CANCELLED})
ACTIVE = frozenset({State.CLAIMED, State.RUNNING})
UNSUCCESSFUL_END = frozenset({State.FAILED, State.SKIPPED, State.CANCELLED})
#: the tasks left: not ended yet (what a run still has to do; a run with none is over)
LEFT = frozenset(State) - TERMINAL
#: the tasks left that are not running yet (waiting for dependencies, ready, or leased)
QUEUED = LEFT - {State.RUNNING}


def left_count(counts: Mapping[str, int]) -> int:
    """How many tasks are left in a table of counts by state label."""
    return sum(counts.get(s.label, 0) for s in LEFT)

_EDGES: frozenset[tuple[State, State]] = frozenset(
    {
        (State.BLOCKED, State.READY),  # all dependencies succeeded
        (State.BLOCKED, State.SKIPPED),  # a dependency ended unsuccessfully
        (State.READY, State.CLAIMED),  # leased
        (State.CLAIMED, State.RUNNING),  # started
        (State.CLAIMED, State.READY),  # released unstarted, or lost before it started
        (State.CLAIMED, State.FAILED),  # lost before start with no budget left
        (State.RUNNING, State.SUCCEEDED),
        (State.RUNNING, State.FAILED),  # failed / timed out / lost with no attempts left
        (State.RUNNING, State.READY),  # failed / timed out / lost, attempts left (after backoff)
        *((s, State.CANCELLED) for s in State if s not in TERMINAL),  # user cancel
        *((s, State.READY) for s in TERMINAL),  # user retry (new attempt budget)
        *((s, State.BLOCKED) for s in TERMINAL),  # user retry of a task whose deps are pending
    }
)


class IllegalTransition(ValueError):
    """A change of state that the task state machine does not allow."""


def allowed(frm: State, to: State) -> bool:
    """Whether a task may move from ``frm`` to ``to``."""
    return (frm, to) in _EDGES


def check(frm: State, to: State) -> None:
    """Raise :class:`IllegalTransition` unless ``frm -> to`` is legal."""
    if (frm, to) not in _EDGES:
        raise IllegalTransition(f"a task cannot go from {State(frm).label} to {State(to).label}")


def sources(to: State) -> tuple[int, ...]:
    """Every state from which a task may move to ``to`` (for SQL ``state IN (...)``)."""
    return tuple(sorted(int(f) for f, t in _EDGES if t == to))


def sql_in(to: State) -> str:
    """``"(a,b,c)"`` of :func:`sources`, ready to paste into a statement."""
    return sql_list(sources(to))


def sql_list(group: Iterable[int]) -> str:
    """``"(a,b,c)"`` of a group of states (e.g. :data:`TERMINAL`) for SQL ``IN``."""
    return "(" + ",".join(str(int(s)) for s in sorted(group)) + ")"


def after_attempt(
    outcome: Outcome, failures: int, max_attempts: int, lost: int, max_lost: int
) -> State:
    """The state a task takes when an attempt ends with ``outcome``.

    ``failures`` and ``lost`` already include this attempt. Failed and timed-out attempts spend
    the task's attempt budget (so do attempts stopped for memory, ``oom``); lost attempts (a worker that vanished) spend a separate budget,
    so a node crash does not eat a task's retries while a task that kills its worker every time
    still ends; released attempts spend nothing.
    """
    if outcome in SUCCESSFUL:
        return State.SUCCEEDED
    if outcome in SPENDS_RETRY:
        return State.READY if failures < max_attempts else State.FAILED
    if outcome == Outcome.LOST:
        return State.READY if lost < max_lost else State.FAILED
    if outcome == Outcome.RELEASED:
        return State.READY
    raise IllegalTransition(f"outcome {outcome.label} does not change a task")


def backoff_delay(base: float, failures: int, cap: float = 3600.0) -> float:
    """Seconds to wait before attempt ``failures + 1``: exponential from ``base``, capped."""
    if base <= 0 or failures <= 0:
        return 0.0
    return min(cap, base * (2 ** (failures - 1)))

"""The task state machine (``pipefarm.states``): legal edges, ``sources``, budgets, backoff."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipefarm.states import (
    ACTIVE,
    TERMINAL,
    UNSUCCESSFUL_END,
    IllegalTransition,
    Outcome,
    State,
    after_attempt,
    allowed,
    backoff_delay,
    check,
    sources,
    sql_in,
)

B, R, C, RUN = State.BLOCKED, State.READY, State.CLAIMED, State.RUNNING
OK, FAIL, SKIP, CANC = State.SUCCEEDED, State.FAILED, State.SKIPPED, State.CANCELLED

# The diagram of DESIGN.md ("Task states"), written out edge by edge, independently of the module.
EXPECTED_EDGES = {
    (B, R),  # all deps succeeded
    (B, SKIP),  # a dependency ended unsuccessfully
    (R, C),  # leased
    (C, RUN),  # started
    (C, R),  # released unstarted / lost before start, budget left
    (C, FAIL),  # lost before start, no budget left
    (RUN, OK),
    (RUN, FAIL),
    (RUN, R),  # failed / timed out / lost with attempts left
    # user cancel: any non-terminal state
    (B, CANC),
    (R, CANC),
    (C, CANC),
    (RUN, CANC),
    # user retry: every terminal state, to ready or (deps pending) blocked
    *((t, R) for t in (OK, FAIL, SKIP, CANC)),
    *((t, B) for t in (OK, FAIL, SKIP, CANC)),
}
ALL_PAIRS = list(itertools.product(State, State))


def test_stored_values_never_renumbered():
    assert [int(s) for s in State] == list(range(8))
    assert [s.label for s in State] == [
        "blocked",
        "ready",
        "claimed",
        "running",
        "succeeded",
        "failed",
        "skipped",
        "cancelled",
    ]
    assert [int(o) for o in Outcome] == list(range(8))
    assert [o.label for o in Outcome] == [
        "succeeded",
        "failed",
        "timed_out",
        "lost",
        "released",
        "stale",
        "cached",
        "oom",
    ]


def test_state_groups():
    assert TERMINAL == {OK, FAIL, SKIP, CANC}
    assert ACTIVE == {C, RUN}
    assert UNSUCCESSFUL_END == {FAIL, SKIP, CANC}
    assert UNSUCCESSFUL_END < TERMINAL


@pytest.mark.parametrize(("frm", "to"), sorted(EXPECTED_EDGES))
def test_legal_transitions(frm, to):
    assert allowed(frm, to)
    check(frm, to)  # does not raise


@pytest.mark.parametrize(
    ("frm", "to"), [p for p in ALL_PAIRS if p not in EXPECTED_EDGES], ids=lambda s: s.label
)
def test_illegal_transitions(frm, to):
    assert not allowed(frm, to)
    with pytest.raises(IllegalTransition, match=f"from {frm.label} to {to.label}"):
        check(frm, to)


def test_illegal_transition_is_a_value_error():
    assert issubclass(IllegalTransition, ValueError)


@pytest.mark.parametrize(
    "frm,to",
    [
        (R, OK),  # a result without a lease
        (C, OK),  # a result without a start
        (B, C),  # leased before its dependencies succeeded
        (OK, FAIL),  # a recorded result is never overwritten
        (OK, SKIP),
        (FAIL, SKIP),
        (CANC, OK),
        (SKIP, CANC),
        (R, SKIP),  # only blocked tasks are skipped
        (RUN, SKIP),
        (R, B),  # only a retry blocks a task again
        (RUN, C),
    ],
    ids=lambda s: s.label,
)
def test_notable_illegal_transitions(frm, to):
    assert not allowed(frm, to)


def test_self_loops_are_illegal():
    for s in State:
        assert not allowed(s, s)


def test_terminal_states_are_left_only_by_retry():
    for t in TERMINAL:
        assert {to for to in State if allowed(t, to)} == {R, B}


def test_every_non_terminal_state_can_be_cancelled():
    for s in State:
        assert allowed(s, CANC) == (s not in TERMINAL)


@pytest.mark.parametrize("to", list(State), ids=lambda s: s.label)
def test_sources_agree_with_allowed(to):
    expected = tuple(sorted(int(f) for f in State if allowed(f, to)))
    assert sources(to) == expected
    assert all(isinstance(s, int) for s in sources(to))
    assert sql_in(to) == "(" + ",".join(map(str, expected)) + ")"


def test_sources_of_key_targets():
    assert sources(R) == tuple(sorted(int(s) for s in (B, C, RUN, OK, FAIL, SKIP, CANC)))
    assert sources(C) == (int(R),)
    assert sources(RUN) == (int(C),)
    assert sources(OK) == (int(RUN),)
    assert sources(FAIL) == (int(C), int(RUN))
    assert sources(SKIP) == (int(B),)
    assert sources(CANC) == (int(B), int(R), int(C), int(RUN))
    assert sources(B) == tuple(sorted(int(s) for s in TERMINAL))
    assert sql_in(C) == "(1)"
    assert sql_in(SKIP) == "(0)"


# --- after_attempt ------------------------------------------------------------------------------


def test_success_always_succeeds():
    assert after_attempt(Outcome.SUCCEEDED, 0, 1, 0, 1) == OK
    assert after_attempt(Outcome.SUCCEEDED, 9, 1, 9, 1) == OK  # even "over budget"


@pytest.mark.parametrize("outcome", [Outcome.FAILED, Outcome.TIMED_OUT])
def test_failures_spend_the_attempt_budget(outcome):
    # failures already counts this attempt
    assert after_attempt(outcome, 1, 3, 0, 3) == R
    assert after_attempt(outcome, 2, 3, 0, 3) == R
    assert after_attempt(outcome, 3, 3, 0, 3) == FAIL
    assert after_attempt(outcome, 1, 1, 0, 3) == FAIL  # a single attempt: no retry
    # the lost budget does not matter to a failure
    assert after_attempt(outcome, 1, 2, 99, 1) == R


def test_lost_attempts_spend_the_lost_budget_only():
    assert after_attempt(Outcome.LOST, 0, 1, 1, 3) == R
    assert after_attempt(Outcome.LOST, 0, 1, 2, 3) == R
    assert after_attempt(Outcome.LOST, 0, 1, 3, 3) == FAIL
    # an exhausted attempt budget does not stop a lost task from going again
    assert after_attempt(Outcome.LOST, 5, 1, 1, 2) == R


def test_released_attempts_spend_nothing():
    assert after_attempt(Outcome.RELEASED, 0, 1, 0, 1) == R
    assert after_attempt(Outcome.RELEASED, 10, 1, 10, 1) == R


def test_stale_outcome_changes_no_task():
    with pytest.raises(IllegalTransition, match="stale"):
        after_attempt(Outcome.STALE, 0, 1, 0, 1)


@given(
    outcome=st.sampled_from([o for o in Outcome if o != Outcome.STALE]),
    failures=st.integers(0, 10),
    max_attempts=st.integers(1, 10),
    lost=st.integers(0, 10),
    max_lost=st.integers(1, 10),
)
def test_after_attempt_is_a_legal_end_of_a_running_attempt(
    outcome, failures, max_attempts, lost, max_lost
):
    to = after_attempt(outcome, failures, max_attempts, lost, max_lost)
    assert allowed(RUN, to)
    if outcome in (Outcome.FAILED, Outcome.TIMED_OUT):
        assert (to == FAIL) == (failures >= max_attempts)
    if outcome == Outcome.LOST:
        assert (to == FAIL) == (lost >= max_lost)


@given(max_attempts=st.integers(1, 20))
def test_a_task_gets_exactly_max_attempts_failures(max_attempts):
    """Counting failures one by one, the task fails for good at exactly ``max_attempts``."""
    states = [after_attempt(Outcome.FAILED, f, max_attempts, 0, 3) for f in range(1, 30)]
    assert states.index(FAIL) == max_attempts - 1
    assert all(s == R for s in states[: max_attempts - 1])


# --- backoff_delay --------------------------------------------------------------------------------


def test_backoff_is_exponential_from_base():
    assert backoff_delay(1.0, 1) == 1.0
    assert backoff_delay(1.0, 2) == 2.0
    assert backoff_delay(1.0, 3) == 4.0
    assert backoff_delay(0.5, 4) == 4.0


def test_backoff_zero_cases():
    assert backoff_delay(0.0, 3) == 0.0
    assert backoff_delay(-1.0, 3) == 0.0
    assert backoff_delay(2.0, 0) == 0.0
    assert backoff_delay(2.0, -1) == 0.0


def test_backoff_is_capped():
    assert backoff_delay(1.0, 100) == 3600.0
    assert backoff_delay(1.0, 5, cap=10.0) == 10.0
    assert backoff_delay(1.0, 3, cap=10.0) == 4.0


@given(
    base=st.floats(0.001, 100.0),
    failures=st.integers(1, 60),
    cap=st.floats(0.001, 1e6),
)
def test_backoff_is_monotone_and_bounded(base, failures, cap):
    d = backoff_delay(base, failures, cap)
    assert 0.0 < d <= cap
    assert backoff_delay(base, failures + 1, cap) >= d

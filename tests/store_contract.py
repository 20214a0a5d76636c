"""The store contract: one property-based suite that every :class:`~pipefarm.store.base.Store` runs.

A store module's tests instantiate it with a factory that builds a store in a fresh, empty run
directory::

    TestSQLiteContract = contract_for(lambda path: SQLiteStore(path, lease_s=10.0))

    class TestSQLiteExamples(ContractExamples):
        make_store = staticmethod(lambda path: SQLiteStore(path, lease_s=10.0))

:func:`contract_for` returns a ``unittest.TestCase`` that drives the store with hypothesis's
stateful testing against an in-memory model: a simulated clock, a few simulated workers, random
interleavings of every operation of the lease protocol and of the user actions, invariants checked
after every step, and at teardown a drain that must bring every task to a terminal state.

The model's reading of the contract (where the docstrings leave room) is written down next to
each rule; the main points:

* claim order is priority (higher first), then cost (higher first), then id (lower first);
* a failed or timed-out attempt with attempts left is claimable again after
  ``backoff_delay(spec.backoff, failures)`` seconds (``failures`` counting this attempt); a lost
  one after some delay between 0 and ``backoff_delay(spec.backoff, failures + lost)``; a released
  one (``release`` or an unstarted lease reaped) at once;
* a lease expires when ``now - last heartbeat > lease_s``; every worker action of the model is
  preceded by a heartbeat, so the suite does not depend on whether claim/start/finish also
  count as heartbeats, and the clock never sits on a boundary (``==``);
* ``reap(workers=...)`` reaps those workers' leases in addition to the expired ones;
* ``finish`` of a claimed, unstarted lease counts as start and end reported together;
* a started lease handed back (``release``) leaves a ``released`` attempt with its token; an
  unstarted one may leave that or nothing (as if never claimed, its attempt number reused);
  otherwise attempt numbers of successive leases of one task increase;
* every ended attempt (``attempts()``) carries its lease's token;
* ``retry()`` with no ids retries the failed tasks (``Store.retry``'s docstring; see
  ``RETRY_DEFAULT``), and their skipped dependents come back; with ids and ``failed_only=True`` the suite passes only
  ids of tasks that did not succeed, so either reading of ``failed_only`` with ids agrees;
* ``retry`` resets the task's ``failures`` and ``lost`` counters (``TaskRow``);
* retrying a task whose dependency ended unsuccessfully leaves it ``skipped`` (it must never be
  left ``blocked`` on a dependency that will not succeed);
* an outcome with a token that was superseded (the task has been leased again since) adds one
  ``stale`` attempt and changes nothing else; one for a lease that merely ended, or with a token
  never issued, changes nothing and may or may not add a ``stale`` attempt;
* ``cancel`` returns the number of tasks it cancelled, with or without the skipped dependents.
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
import sys
import tempfile
import unittest
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pipefarm.states import (
    ACTIVE,
    TERMINAL,
    UNSUCCESSFUL_END,
    Outcome,
    State,
    after_attempt,
    allowed,
    backoff_delay,
)
from pipefarm.store.base import Store, TaskRow
from pipefarm.task import Finished, Lease, Resources, Spec

#: Builds a store in an existing, empty run directory.
StoreFactory = Callable[[str], Store]

WORKERS = ("w0", "w1", "w2")
DRAINER = "drainer"
T0 = 1_000_000.0
EPS = 1e-6
#: backoff bases, in lease times
BACKOFFS = (0.0, 0.13, 0.37)
LABELS = [s.label for s in State]
ENDING_OUTCOMES = (Outcome.SUCCEEDED, Outcome.FAILED, Outcome.TIMED_OUT)
#: what the ``work`` rule's worker reports: mostly successes, so that dependencies release
WORK_OUTCOMES = (Outcome.SUCCEEDED, Outcome.SUCCEEDED, Outcome.FAILED, Outcome.TIMED_OUT)


def sort_key(priority: int, cost: float, task: int) -> tuple[int, float, int]:
    """Claim order: priority, then cost (both higher first), then id (lower first)."""
    return (-priority, -cost, task)


#: what ``retry()`` (no ids, ``failed_only=True``) retries: "failed, skipped and cancelled ones
#: by default" (Store.retry's docstring)
RETRY_DEFAULT = frozenset({State.FAILED})  # Store.retry: "By default the failed tasks"


def legal_change(frm: State, to: State) -> bool:
    """One legal transition, or two in one call: a retry through ``blocked`` (which may skip the
    task again at once), or a finish of an unstarted lease through ``running``."""
    return allowed(frm, to) or any(
        allowed(frm, via) and allowed(via, to) for via in (State.BLOCKED, State.RUNNING)
    )


@dataclass
class MTask:
    """The model of one task."""

    id: int
    spec: int
    priority: int
    cost: float
    deps: tuple[int, ...]
    key: str | None
    args: bytes | None
    state: State
    failures: int = 0
    lost: int = 0
    # when a READY task becomes claimable: certainly by ready_hi, certainly not before ready_lo
    ready_lo: float = -math.inf
    ready_hi: float = -math.inf
    result: bytes | None = None  # the blob of the succeeding finish
    issued: list[int] = field(default_factory=list)  # every token leased for it, oldest first
    last_attempt: int | None = None
    last_started: bool = False  # whether the lease that had last_attempt was started


@dataclass
class MLease:
    task: int
    token: int
    worker: str
    attempt: int


class StoreMachine(RuleBasedStateMachine):
    """Drives a store and an in-memory model side by side; see the module docstring."""

    #: set by :func:`contract_for`
    store_factory: StoreFactory

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="pipefarm-contract-")
        self.store: Store = type(self).store_factory(self.tmp)
        self.lease_s = float(self.store.lease_s)
        self.now = T0
        self.specs: dict[int, Spec] = {}
        self.tasks: dict[int, MTask] = {}
        self.live: dict[int, MLease] = {}  # task -> its one live lease
        self.dead: list[MLease] = []  # leases that ended; their holders may still report
        self.hb: dict[str, float] = {}
        self.next_id: int | None = None
        self.keys = 0
        self.values = 0
        self.prev_states: dict[int, State] = {}
        self.steps = 0
        for i, w in enumerate(WORKERS):
            self.store.register_worker(w, "host", 1000 + i, now=self.now)
            self.hb[w] = self.now

    def teardown(self) -> None:
        try:
            if sys.exc_info()[0] is None:  # not while a failing step propagates
                self._drain()
        finally:
            try:
                self.store.close()
            finally:
                shutil.rmtree(self.tmp, ignore_errors=True)

    # --- helpers ----------------------------------------------------------------------------------
    def _settle_clock(self) -> None:
        """Move the clock off every boundary (lease expiry, ready_at) the store compares with."""
        bounds = [h + self.lease_s for h in self.hb.values()]
        for t in self.tasks.values():
            if t.state == State.READY:
                bounds += [t.ready_lo, t.ready_hi]
        while any(abs(self.now - b) < EPS for b in bounds):
            self.now += 0.125

    def _advance(self, dt: float) -> None:
        self.now += dt
        self._settle_clock()

    def _beat(self, w: str) -> None:
        self.store.heartbeat(w, now=self.now)
        self.hb[w] = self.now

    def _spec_of(self, t: MTask) -> Spec:
        return self.specs[t.spec]

    def _settle_deps(self) -> None:
        """Blocked tasks whose dependencies all succeeded become ready; those with a dependency
        that ended unsuccessfully are skipped. Dependencies have smaller ids: one pass is enough."""
        for tid in sorted(self.tasks):
            t = self.tasks[tid]
            if t.state != State.BLOCKED:
                continue
            ds = [self.tasks[d].state for d in t.deps]
            if any(s in UNSUCCESSFUL_END for s in ds):
                t.state = State.SKIPPED
            elif all(s == State.SUCCEEDED for s in ds):
                t.state = State.READY
                t.ready_lo = t.ready_hi = -math.inf

    def _kill(self, tid: int) -> None:
        lease = self.live.pop(tid, None)
        if lease is not None:
            self.dead.append(lease)

    def _row(self, tid: int) -> TaskRow:
        (row,) = self.store.tasks(ids=[tid])
        return row

    def _signature(self, tid: int) -> tuple:
        r = self._row(tid)
        res = self.store.result(tid)
        return (
            r.state,
            r.failures,
            r.lost,
            r.worker,
            r.started_at,
            r.ended_at,
            r.exit_code,
            r.error,
            r.note,
            res,
        )

    def _model_sig(self, tid: int) -> tuple:
        t = self.tasks[tid]
        return (t.state, t.failures, t.lost, t.result, tid in self.live)

    def _outcomes_of(self, tid: int, token: int) -> list[str]:
        return [a.outcome for a in self.store.attempts(tid) if a.token == token]

    def _stale_count(self, tid: int) -> int:
        return sum(a.outcome == Outcome.STALE.label for a in self.store.attempts(tid))

    def _superseded(self, lease: MLease) -> bool:
        """Whether the task has been leased again since this lease was given."""
        return self.tasks[lease.task].issued[-1] != lease.token

    def _wrong_token(self, tid: int, seed: int) -> int:
        token = seed
        while token in self.tasks[tid].issued:
            token += 7919
        return token

    def _new_value(self, lease: MLease) -> bytes:
        self.values += 1
        return pickle.dumps(("value", lease.task, lease.token, self.values))

    # --- the model's side of each operation ---------------------------------------------------------
    def _add_spec(self, max_attempts: int, max_lost: int, backoff: float) -> None:
        spec = Spec(
            kind="py",
            payload=pickle.dumps("fn"),
            max_attempts=max_attempts,
            max_lost=max_lost,
            backoff=backoff * self.lease_s,
            name=f"spec{len(self.specs)}",
        )
        sid = self.store.add_spec(spec)
        assert sid not in self.specs, "add_spec returned an id already in use"
        assert self.store.spec(sid) == spec, "spec() does not return what add_spec stored"
        self.specs[sid] = spec

    def _do_claim(self, w: str, n: int) -> list[Lease]:
        self._settle_clock()
        self._beat(w)
        leases = self.store.claim(w, n, now=self.now)
        now = self.now
        ready = [t for t in self.tasks.values() if t.state == State.READY]
        certain = {t.id for t in ready if t.ready_hi <= now}
        possible = {t.id for t in ready if t.ready_lo <= now}
        got = [lease.task for lease in leases]
        assert len(got) == len(set(got)), f"claim leased a task twice in one call: {got}"
        assert len(got) <= n, f"claim({n}) returned {len(got)} leases"
        for lease in leases:
            assert lease.task in self.tasks, f"claim leased unknown task {lease.task}"
            assert lease.task not in self.live, (
                f"task {lease.task} leased to {w} while {self.live[lease.task].worker} "
                f"holds a live lease on it"
            )
            t = self.tasks[lease.task]
            assert lease.task in possible, (
                f"claim leased task {lease.task} which is {t.state.label} "
                f"(claimable from {t.ready_lo}, now {now})"
            )
            assert lease.token not in t.issued, f"token {lease.token} reused for task {t.id}"
            assert lease.spec == t.spec
            assert lease.args == t.args
            if t.last_attempt is not None:
                # a lease handed back unstarted may leave no attempt behind: its number is reused
                assert lease.attempt > t.last_attempt or (
                    not t.last_started and lease.attempt == t.last_attempt
                ), f"attempt number went from {t.last_attempt} to {lease.attempt} on task {t.id}"
        if len(got) < n:
            missing = certain - set(got)
            assert not missing, f"claim({n}) returned {got} but left claimable tasks {missing}"
        if got:
            worst = max(sort_key(self.tasks[i].priority, self.tasks[i].cost, i) for i in got)
            for i in certain - set(got):
                t = self.tasks[i]
                assert sort_key(t.priority, t.cost, i) > worst, (
                    f"claim order: task {i} (priority {t.priority}, cost {t.cost}) was passed "
                    f"over for {[(j, self.tasks[j].priority, self.tasks[j].cost) for j in got]}"
                )
        for lease in leases:
            t = self.tasks[lease.task]
            t.state = State.CLAIMED
            t.issued.append(lease.token)
            t.last_attempt = lease.attempt
            t.last_started = False
            self.live[lease.task] = MLease(lease.task, lease.token, w, lease.attempt)
        return leases

    def _do_start(self, good: list[MLease], stale: list[tuple[int, int]]) -> None:
        for w in sorted({lease.worker for lease in good}):
            self._beat(w)
        pairs = [(lease.task, lease.token) for lease in good] + stale
        moved = self.store.start(pairs, now=self.now)
        assert moved == len(good), f"start({pairs}) moved {moved}, expected {len(good)}"
        for lease in good:
            self.tasks[lease.task].state = State.RUNNING
            self.tasks[lease.task].last_started = True

    def _do_finish(
        self,
        w: str,
        good: list[tuple[MLease, Outcome]],
        stale: list[MLease],
        wrong: list[tuple[int, int]],
        late: Outcome = Outcome.SUCCEEDED,
    ) -> None:
        """``good`` leases end as given; ``stale`` (ended leases) and ``wrong`` (never issued
        tokens) report ``late``, and must change nothing."""
        self._beat(w)
        outcomes: list[Finished] = []
        blobs: dict[int, bytes] = {}
        for lease, outcome in good:
            if outcome == Outcome.SUCCEEDED:
                blobs[lease.task] = self._new_value(lease)
                outcomes.append(
                    Finished(lease.task, lease.token, int(outcome), self.now - 1, self.now,
                             result=blobs[lease.task], exit_code=0)
                )
            else:
                outcomes.append(
                    Finished(lease.task, lease.token, int(outcome), self.now - 1, self.now,
                             error=f"{outcome.label} on purpose", exit_code=1)
                )
        for lease in stale:  # a zombie reporting on a lease it no longer holds
            outcomes.append(
                Finished(lease.task, lease.token, int(late), self.now - 1, self.now,
                         result=self._new_value(lease) if late == Outcome.SUCCEEDED else None,
                         error=None if late == Outcome.SUCCEEDED else "zombie")
            )
        for tid, token in wrong:
            outcomes.append(
                Finished(tid, token, int(late), self.now - 1, self.now, error="bogus")
            )
        bystanders = {lease.task for lease in stale} | {tid for tid, _ in wrong}
        before = {tid: (self._model_sig(tid), self._signature(tid)) for tid in bystanders}
        stale_before = {lease.task: self._stale_count(lease.task) for lease in stale}

        took = self.store.finish(w, outcomes, now=self.now)

        for lease, outcome in good:
            t = self.tasks[lease.task]
            spec = self._spec_of(t)
            self._kill(lease.task)
            t.last_started = True  # a worker may report start and end together
            if outcome == Outcome.SUCCEEDED:
                t.state = State.SUCCEEDED
                t.result = blobs[lease.task]
            else:
                t.failures += 1
                t.state = after_attempt(outcome, t.failures, spec.max_attempts, t.lost,
                                        spec.max_lost)
                t.result = None
                if t.state == State.READY:
                    t.ready_lo = t.ready_hi = self.now + backoff_delay(spec.backoff, t.failures)
        self._settle_deps()
        assert took == len(good), f"finish took effect {took} times, expected {len(good)}"
        for lease, outcome in good:
            assert outcome.label in self._outcomes_of(lease.task, lease.token), (
                f"no {outcome.label} attempt with token {lease.token} on task {lease.task}"
            )
        for tid, (model_before, store_before) in before.items():
            if self._model_sig(tid) == model_before:
                assert self._signature(tid) == store_before, (
                    f"a finish with a stale or wrong token changed task {tid}: "
                    f"{store_before} -> {self._signature(tid)}"
                )
        # each superseded outcome adds one stale attempt; an outcome for a lease that merely
        # ended (the task not leased again since), or with a token never issued, may add one
        superseded = {tid: 0 for tid in stale_before}
        sent = {tid: 0 for tid in stale_before}
        for lease in stale:
            sent[lease.task] += 1
            superseded[lease.task] += self._superseded(lease)
        for tid, _ in wrong:
            if tid in sent:
                sent[tid] += 1
        for tid, n in superseded.items():
            added = self._stale_count(tid) - stale_before[tid]
            assert n <= added <= sent[tid], (
                f"task {tid}: {n} superseded finish(es) (of {sent[tid]} late ones) added {added} "
                f"stale attempt(s); attempts: {self.store.attempts(tid)}"
            )

    def _do_release(self, w: str, good: list[MLease], stale: list[MLease]) -> None:
        self._beat(w)
        bystanders = {lease.task for lease in stale} - {lease.task for lease in good}
        before = {tid: (self._model_sig(tid), self._signature(tid)) for tid in bystanders}
        pairs = [(lease.task, lease.token) for lease in good + stale]
        n = self.store.release(w, pairs, now=self.now)
        assert n == len(good), f"release({pairs}) released {n}, expected {len(good)}"
        for lease in good:
            t = self.tasks[lease.task]
            self._kill(lease.task)
            started, t.state = t.state == State.RUNNING, State.READY
            t.ready_lo = t.ready_hi = self.now  # releasing spends nothing: claimable at once
            self._check_released(t.id, lease.token, started)
        for tid, (model_before, store_before) in before.items():
            if self._model_sig(tid) == model_before:
                assert self._signature(tid) == store_before, (
                    f"a release with a stale token changed task {tid}"
                )

    def _check_released(self, tid: int, token: int, started: bool) -> None:
        """A started lease handed back leaves a ``released`` attempt; an unstarted one may leave
        that or nothing at all (as if it had never been claimed)."""
        outcomes = self._outcomes_of(tid, token)
        released = [Outcome.RELEASED.label]
        assert outcomes == released or (not started and outcomes == []), (
            f"released lease {token} of task {tid} (started: {started}) left attempts {outcomes}"
        )

    def _do_reap(self, workers: list[str] | None) -> None:
        self._settle_clock()
        # expired leases are reaped in any case; ``workers`` adds those workers' leases
        expired = {w for w, h in self.hb.items() if self.now - h > self.lease_s}
        if workers is None:
            n = self.store.reap(now=self.now)
        else:
            n = self.store.reap(now=self.now, workers=workers)
            expired |= set(workers)
        reaped = [lease for lease in self.live.values() if lease.worker in expired]
        assert n == len(reaped), (
            f"reap at {self.now} reaped {n} leases, expected {len(reaped)} "
            f"({[(lease.task, lease.worker) for lease in reaped]})"
        )
        for lease in reaped:
            t = self.tasks[lease.task]
            spec = self._spec_of(t)
            self._kill(lease.task)
            if t.state == State.CLAIMED:  # never started: released, nothing spent
                t.state = State.READY
                t.ready_lo = t.ready_hi = self.now
                self._check_released(t.id, lease.token, started=False)
                continue
            else:
                t.lost += 1
                t.state = after_attempt(Outcome.LOST, t.failures, spec.max_attempts, t.lost,
                                        spec.max_lost)
                t.ready_lo = self.now
                t.ready_hi = self.now + backoff_delay(spec.backoff, t.failures + t.lost)
            outcomes = self._outcomes_of(lease.task, lease.token)
            assert outcomes == [Outcome.LOST.label], (
                f"reaped lease {lease.token} of task {lease.task} should end lost; "
                f"its attempts: {outcomes}"
            )
        self._settle_deps()

    def _do_cancel(self, ids: list[int] | None) -> None:
        n = self.store.cancel(ids)
        targets = [
            tid
            for tid in (sorted(self.tasks) if ids is None else ids)
            if self.tasks[tid].state not in TERMINAL
        ]
        for tid in targets:
            self.tasks[tid].state = State.CANCELLED
            self._kill(tid)
        skipped_before = {tid for tid, t in self.tasks.items() if t.state == State.SKIPPED}
        self._settle_deps()
        skipped = {tid for tid, t in self.tasks.items() if t.state == State.SKIPPED}
        # cancel returns the number of tasks it cancelled (skipped dependents may count or not)
        assert n in (len(targets), len(targets) + len(skipped - skipped_before)), (
            f"cancel({ids}) returned {n}; cancelled {len(targets)}"
        )

    def _do_retry(self, ids: list[int] | None, failed_only: bool) -> None:
        self.store.retry(ids, failed_only=failed_only)
        if ids is None:
            wanted = RETRY_DEFAULT if failed_only else TERMINAL
        else:
            wanted = UNSUCCESSFUL_END if failed_only else TERMINAL
        targets = {
            tid
            for tid in (sorted(self.tasks) if ids is None else ids)
            if self.tasks[tid].state in wanted
        }
        revived = set(targets)
        for tid in sorted(self.tasks):
            t = self.tasks[tid]
            if tid in targets:
                t.state = State.BLOCKED
                t.failures = t.lost = 0
                t.result = None
            elif t.state == State.SKIPPED and any(d in revived for d in t.deps):
                t.state = State.BLOCKED
                revived.add(tid)
        self._settle_deps()

    # --- rules ----------------------------------------------------------------------------------------
    @initialize(
        max_attempts=st.integers(1, 3), max_lost=st.integers(1, 3), backoff=st.sampled_from(BACKOFFS)
    )
    def first_spec(self, max_attempts, max_lost, backoff):
        self._add_spec(max_attempts, max_lost, backoff)

    @precondition(lambda self: len(self.specs) < 3)
    @rule(
        max_attempts=st.integers(1, 3), max_lost=st.integers(1, 3), backoff=st.sampled_from(BACKOFFS)
    )
    def add_spec(self, max_attempts, max_lost, backoff):
        self._add_spec(max_attempts, max_lost, backoff)

    @rule(
        spec=st.integers(0, 2),
        n=st.integers(1, 3),
        priority=st.integers(0, 1),  # few values: ties, so that cost and id decide often
        cost=st.sampled_from((0.0, 1.0, 2.5)),
        deps=st.lists(st.integers(0, 1000), max_size=2),
        keyed=st.booleans(),
        bad_dep=st.integers(0, 7),
    )
    def add_tasks(self, spec, n, priority, cost, deps, keyed, bad_dep):
        """Add tasks, maybe after some existing ones; now and then first try with an unknown
        dependency, which must be refused with nothing written."""
        sid = sorted(self.specs)[spec % len(self.specs)]
        ids = sorted(self.tasks)
        after = sorted({ids[d % len(ids)] for d in deps}) if ids else []
        if bad_dep == 0:
            before = self.store.counts()
            with pytest.raises(ValueError):
                self.store.add_tasks(sid, [None] * n, after=[*after, (self.next_id or 0) + 1000])
            assert self.store.counts() == before, "a refused add_tasks wrote something"
        keys = None
        if keyed:
            keys = [f"key{self.keys + i}" for i in range(n)]
            self.keys += n
        args = [pickle.dumps((i, "arg")) if i % 2 else None for i in range(n)]
        r = self.store.add_tasks(sid, args, keys=keys, priority=priority, cost=cost, after=after)
        assert len(r) == n and r.step == 1, f"add_tasks returned {r!r} for {n} tasks"
        if self.next_id is not None:
            assert r.start == self.next_id, f"ids not dense: expected {self.next_id}, got {r!r}"
        self.next_id = r.stop
        for i, tid in enumerate(r):
            assert tid not in self.tasks
            self.tasks[tid] = MTask(
                id=tid,
                spec=sid,
                priority=priority,
                cost=cost,
                deps=tuple(after),
                key=keys[i] if keys else None,
                args=args[i],
                state=State.BLOCKED,
            )
        self._settle_deps()

    @rule(w=st.sampled_from(WORKERS), n=st.integers(1, 4))
    def claim(self, w, n):
        self._do_claim(w, n)

    @rule(
        w=st.sampled_from(WORKERS),
        n=st.integers(1, 3),
        outcomes=st.lists(st.sampled_from(WORK_OUTCOMES), min_size=1, max_size=3),
    )
    def work(self, w, n, outcomes):
        """A worker's loop in one step: claim, start everything, finish some (the rest keeps
        running). Keeps runs moving between the finer-grained rules."""
        leases = self._do_claim(w, n)
        self.check_all()
        if not leases:
            return
        good = [self.live[lease.task] for lease in leases]
        self._do_start(good, [])
        self.check_all()
        self._do_finish(w, list(zip(good, outcomes, strict=False)), [], [])

    @rule(
        n=st.integers(1, 4),
        started=st.integers(0, 15),
        outcomes=st.lists(st.sampled_from(WORK_OUTCOMES), min_size=1, max_size=4),
    )
    def coordinator(self, n, started, outcomes):
        """The local backend's coordinator in one round, between the other rules: lease ready
        tasks (``lease_ready``), mark some running on a worker (``start_leased``), commit every
        outcome (``finish_leased``: plain successes as rows, the rest as ``Finished``). The
        leases obey claim's order and tokens; the outcomes commit as ``finish`` commits them."""
        self._settle_clock()
        inflight = set(self.live)
        leases, _ = self.store.lease_ready(n, inflight, None, None, now=self.now)
        self._check_leased(leases, n, inflight)
        worker = WORKERS[started % len(WORKERS)]
        self._beat(worker)
        run = [lz for i, lz in enumerate(leases) if started >> i & 1]
        if run:
            moved = self.store.start_leased(worker, run, now=self.now)
            assert moved == len(run), f"start_leased moved {moved}, expected {len(run)}"
        rows, others, blobs = [], [], {}
        for i, lz in enumerate(leases):
            outcome = outcomes[i % len(outcomes)]
            if outcome == Outcome.SUCCEEDED:
                self.values += 1
                blobs[lz.task] = pickle.dumps(("coordinator", lz.task, lz.token, self.values))
                rows.append((lz.task, lz.token, lz.attempt, self.now - 1, self.now,
                             blobs[lz.task], worker))
            else:
                others.append(Finished(lz.task, lz.token, int(outcome), self.now - 1, self.now,
                                       error=f"{outcome.label} on purpose", exit_code=1,
                                       attempt=lz.attempt))
        for lz in leases:  # leased and run in this one step: legal steps the invariant did not see
            self.prev_states[lz.task] = State.RUNNING
        took = self.store.finish_leased(worker, rows, others, now=self.now)
        assert took == len(leases), f"finish_leased took effect {took} times, not {len(leases)}"
        for i, lz in enumerate(leases):
            t = self.tasks[lz.task]
            outcome = outcomes[i % len(outcomes)]
            t.issued.append(lz.token)
            t.last_attempt = lz.attempt
            t.last_started = True
            if outcome == Outcome.SUCCEEDED:
                t.state = State.SUCCEEDED
                t.result = blobs[lz.task]
            else:
                spec = self._spec_of(t)
                t.failures += 1
                t.state = after_attempt(outcome, t.failures, spec.max_attempts, t.lost,
                                        spec.max_lost)
                t.result = None
                if t.state == State.READY:
                    t.ready_lo = t.ready_hi = self.now + backoff_delay(spec.backoff, t.failures)
            assert outcome.label in self._outcomes_of(lz.task, lz.token), (
                f"no {outcome.label} attempt with token {lz.token} on task {lz.task}"
            )
        self._settle_deps()
        # a late commit of a lease whose task succeeded changes nothing (a task ready again after
        # a failure is not checked: an in-memory lease leaves no token there to compare with)
        done = [lz for lz in leases if self.tasks[lz.task].state == State.SUCCEEDED]
        if done:
            lz = done[0]
            before = (self._model_sig(lz.task), self._signature(lz.task))
            again = self.store.finish_leased(
                worker, [(lz.task, lz.token, lz.attempt, self.now - 1, self.now, b"late", worker)],
                now=self.now)
            assert again == 0, "a repeated finish_leased took effect"
            assert (self._model_sig(lz.task), self._signature(lz.task)) == before, (
                f"a repeated finish_leased changed task {lz.task}")

    def _check_leased(self, leases: list[Lease], n: int, inflight: set[int]) -> None:
        """``lease_ready`` hands out what ``claim`` would: claimable tasks, in claim order, none
        in flight, fresh tokens, the next attempt number."""
        now = self.now
        ready = [t for t in self.tasks.values() if t.state == State.READY]
        certain = {t.id for t in ready if t.ready_hi <= now}
        possible = {t.id for t in ready if t.ready_lo <= now}
        got = [lz.task for lz in leases]
        assert len(got) == len(set(got)) and len(got) <= n, f"lease_ready({n}) gave {got}"
        for lz in leases:
            t = self.tasks[lz.task]
            assert lz.task not in inflight, f"lease_ready handed out task {lz.task} in flight"
            assert lz.task in possible, f"lease_ready leased task {lz.task}, {t.state.label}"
            assert lz.token not in t.issued, f"token {lz.token} reused for task {t.id}"
            assert (lz.spec, lz.args) == (t.spec, t.args)
            if t.last_attempt is not None:
                assert lz.attempt > t.last_attempt or (
                    not t.last_started and lz.attempt == t.last_attempt
                ), f"attempt number went from {t.last_attempt} to {lz.attempt} on task {t.id}"
        if len(got) < n:
            assert not certain - set(got), f"lease_ready({n}) left {certain - set(got)} ready"
        if got:
            worst = max(sort_key(self.tasks[i].priority, self.tasks[i].cost, i) for i in got)
            for i in certain - set(got):
                t = self.tasks[i]
                assert sort_key(t.priority, t.cost, i) > worst, f"lease_ready passed over {i}"

    @precondition(lambda self: any(self.tasks[i].state == State.CLAIMED for i in self.live))
    @rule(
        picks=st.lists(st.integers(0, 100), min_size=1, max_size=3),
        stale=st.integers(0, 100),
        seed=st.integers(-(2**62), 2**62),
    )
    def start(self, picks, stale, seed):
        """Start some claimed leases; maybe with a late start of an ended lease, or a wrong token
        for a task claimed by someone else, in the same batch (neither may move anything)."""
        claimed = [lease for tid, lease in sorted(self.live.items())
                   if self.tasks[tid].state == State.CLAIMED]
        good = list({claimed[p % len(claimed)].task: claimed[p % len(claimed)]
                     for p in picks}.values())
        pairs = []
        if self.dead and stale % 3 == 1:
            old = self.dead[stale % len(self.dead)]
            pairs.append((old.task, old.token))
        others = [lease.task for lease in claimed if lease not in good]
        if others and stale % 3 == 2:
            tid = others[stale % len(others)]
            pairs.append((tid, self._wrong_token(tid, seed)))
        self._do_start(good, pairs)

    @precondition(lambda self: bool(self.live))
    @rule(
        picks=st.lists(
            st.tuples(st.integers(0, 100), st.sampled_from(ENDING_OUTCOMES)), min_size=1, max_size=3
        ),
        stale=st.lists(st.integers(0, 100), max_size=2),
        seed=st.integers(-(2**62), 2**62),
    )
    def finish(self, picks, stale, seed):
        """Finish some leases of one worker (most running; a worker may also report start and end
        together), maybe with its own ended leases and a wrong token in the same batch."""
        live = [lease for _, lease in sorted(self.live.items())]
        w = live[picks[0][0] % len(live)].worker
        mine = [lease for lease in live if lease.worker == w]
        good = {}
        for p, outcome in picks:
            lease = mine[p % len(mine)]
            good.setdefault(lease.task, (lease, outcome))
        old = [lease for lease in self.dead if lease.worker == w and lease.task not in good]
        zombies = list({old[s % len(old)].token: old[s % len(old)] for s in stale}.values()) if old else []
        others = [lease.task for lease in live if lease.task not in good]
        wrong = []
        if others and seed % 2:
            tid = others[seed % len(others)]
            wrong.append((tid, self._wrong_token(tid, seed)))
        self._do_finish(w, list(good.values()), zombies, wrong)

    @precondition(lambda self: any(t.state == State.RUNNING for t in self.tasks.values()))
    @rule(pick=st.integers(0, 1000), n=st.integers(1, 4), outcome=st.sampled_from(ENDING_OUTCOMES))
    def takeover(self, pick, n, outcome):
        """A worker is declared dead while it runs a task (reap with ``workers=``); another worker
        claims and starts; then the first one, a zombie, reports on the lease it lost."""
        running = [lease for _, lease in sorted(self.live.items())
                   if self.tasks[lease.task].state == State.RUNNING]
        zombie = running[pick % len(running)]
        self._do_reap([zombie.worker])
        self.check_all()
        other = WORKERS[(WORKERS.index(zombie.worker) + 1) % len(WORKERS)]
        leases = self._do_claim(other, n)
        self.check_all()
        if leases:
            self._do_start([self.live[lease.task] for lease in leases], [])
            self.check_all()
        self._do_finish(zombie.worker, [], [zombie], [], outcome)

    @precondition(lambda self: bool(self.dead) or bool(self.tasks))
    @rule(pick=st.integers(0, 1000), seed=st.integers(-(2**62), 2**62),
          outcome=st.sampled_from(ENDING_OUTCOMES))
    def finish_late(self, pick, seed, outcome):
        """A zombie reports on a lease that ended (reaped, released, cancelled, finished), or a
        confused worker reports with a token never issued for the task."""
        if self.dead and pick % 3:
            lease = self.dead[pick % len(self.dead)]
            self._do_finish(lease.worker, [], [lease], [], outcome)
        elif self.tasks:
            live = sorted(self.live) or sorted(self.tasks)  # a live task is the interesting case
            tid = live[pick % len(live)]
            w = self.live[tid].worker if tid in self.live else WORKERS[pick % len(WORKERS)]
            self._do_finish(w, [], [], [(tid, self._wrong_token(tid, seed))])

    @precondition(lambda self: bool(self.live))
    @rule(picks=st.lists(st.integers(0, 100), min_size=1, max_size=3), stale=st.integers(0, 100))
    def release(self, picks, stale):
        """A worker hands some leases back (unstarted, or stopped by a known cause), maybe with an
        ended lease in the batch (which must change nothing)."""
        leases = sorted(self.live.values(), key=lambda lease: lease.task)
        w = leases[picks[0] % len(leases)].worker
        mine = [lease for lease in leases if lease.worker == w]
        good = list({mine[p % len(mine)].task: mine[p % len(mine)] for p in picks}.values())
        old = [lease for lease in self.dead if lease.task not in {g.task for g in good}]
        zombies = [old[stale % len(old)]] if old and stale % 2 else []
        self._do_release(w, good, zombies)

    @rule(dt=st.sampled_from((0.0, 0.3, 0.7, 1.2, 2.5)), alive=st.sets(st.sampled_from(WORKERS)))
    def reap(self, dt, alive):
        """``dt`` lease times pass, the ``alive`` workers heartbeat half-way, then reap: leases
        of workers silent for more than a lease time are lost (or released, if unstarted)."""
        self._advance(dt / 2 * self.lease_s)
        for w in sorted(alive):
            self._beat(w)
        self._advance(dt / 2 * self.lease_s)
        self._do_reap(None)

    @precondition(lambda self: bool(self.tasks))
    @rule(picks=st.lists(st.integers(0, 1000), min_size=1, max_size=3), everything=st.integers(0, 15))
    def cancel(self, picks, everything):
        ids = sorted(self.tasks)
        chosen = None if everything == 0 else sorted({ids[p % len(ids)] for p in picks})
        self._do_cancel(chosen)

    @precondition(lambda self: any(t.state in UNSUCCESSFUL_END for t in self.tasks.values()))
    @rule(picks=st.lists(st.integers(0, 1000), min_size=1, max_size=3), everything=st.booleans())
    def retry(self, picks, everything):
        """Retry unsuccessful tasks (all of them, or a few ids that may include non-terminal ones,
        which are left alone)."""
        ids = [t.id for t in self.tasks.values() if t.state != State.SUCCEEDED]
        chosen = None if everything else sorted({ids[p % len(ids)] for p in picks})
        self._do_retry(chosen, failed_only=True)

    @precondition(
        lambda self: any(
            t.state == State.SUCCEEDED and not self._dependents(t.id) for t in self.tasks.values()
        )
    )
    @rule(pick=st.integers(0, 1000))
    def retry_succeeded(self, pick):
        """Run a succeeded task again (``failed_only=False``); only tasks nobody depends on, so that
        no dependent has already run on the result being replaced."""
        ids = [t.id for t in self.tasks.values()
               if t.state == State.SUCCEEDED and not self._dependents(t.id)]
        self._do_retry([ids[pick % len(ids)]], failed_only=False)

    def _dependents(self, tid: int) -> list[int]:
        return [t.id for t in self.tasks.values() if tid in t.deps]

    # --- invariants -------------------------------------------------------------------------------------
    @invariant()
    def store_agrees_with_model(self):
        rows = self.store.tasks()
        assert [r.id for r in rows] == sorted(self.tasks), "tasks() lost or invented tasks"
        for r in rows:
            t = self.tasks[r.id]
            spec = self._spec_of(t)
            assert r.state == t.state.label, (
                f"task {r.id} is {r.state} in the store, {t.state.label} in the model"
            )
            prev = self.prev_states.get(r.id)
            if prev is not None and prev != t.state:
                assert legal_change(prev, t.state), f"task {r.id}: {prev.label} -> {t.state.label}"
            assert (r.failures, r.lost) == (t.failures, t.lost), (
                f"task {r.id}: failures/lost {r.failures}/{r.lost}, expected {t.failures}/{t.lost}"
            )
            assert r.failures <= spec.max_attempts and r.lost <= spec.max_lost
            assert (r.priority, r.cost, r.spec, r.key) == (t.priority, t.cost, t.spec, t.key)
            if t.state in ACTIVE:
                assert r.worker == self.live[r.id].worker, (
                    f"task {r.id} held by {r.worker} in the store, "
                    f"{self.live[r.id].worker} in the model"
                )
            if t.state == State.SUCCEEDED:
                state, blob, _ = self.store.result(r.id)
                assert state == "succeeded"
                assert blob == t.result, f"task {r.id} has another finish's result"
        self.prev_states = {tid: t.state for tid, t in self.tasks.items()}

    @invariant()
    def queries_agree(self):
        """The query side's filters, on a different state label and id subset each step."""
        self.steps += 1
        ids = sorted(self.tasks)
        label = LABELS[self.steps % len(LABELS)]
        expect = [i for i in ids if self.tasks[i].state.label == label]
        assert [r.id for r in self.store.tasks(state=label)] == expect, f"tasks(state={label!r})"
        chosen = ids[self.steps % 3 :: 3]
        rows = self.store.tasks(ids=list(reversed(chosen)))
        assert [r.id for r in rows] == chosen, "tasks(ids=...) are not those tasks in id order"
        limit = self.steps % 4
        assert [r.id for r in self.store.tasks(limit=limit)] == ids[:limit], f"tasks(limit={limit})"
        assert len(list(self.store.results())) == len(ids), "results() is not one row per task"
        for tid in chosen[:2]:
            assert all(a.task == tid for a in self.store.attempts(tid))

    @invariant()
    def one_live_lease_per_task(self):
        for tid, lease in self.live.items():
            assert self.tasks[tid].state in ACTIVE
            assert lease.token == self.tasks[tid].issued[-1]
        for tid, t in self.tasks.items():
            assert (t.state in ACTIVE) == (tid in self.live)

    @invariant()
    def counts_add_up(self):
        counts = self.store.counts()
        assert set(LABELS) <= set(counts), f"counts() lacks states: {counts}"
        assert sum(counts[label] for label in LABELS) == len(self.tasks)
        for s in State:
            assert counts[s.label] == sum(t.state == s for t in self.tasks.values()), (
                f"counts()[{s.label!r}] = {counts[s.label]}"
            )

    # --- teardown: run everything to the end -------------------------------------------------------------
    def _drain(self) -> None:
        """Reap whatever is left in flight and run every task to a terminal state."""
        self.store.register_worker(DRAINER, "host", 4242, now=self.now)
        self.hb[DRAINER] = self.now
        for _ in range(100):
            self.check_all()
            if all(t.state in TERMINAL for t in self.tasks.values()):
                break
            horizon = max(
                [self.lease_s]
                + [t.ready_hi - self.now for t in self.tasks.values() if t.state == State.READY]
            )
            self._advance(horizon + 1.0)
            self._do_reap(None)
            self.check_all()
            leases = self._do_claim(DRAINER, 10_000)
            self.check_all()
            if not leases:
                continue
            good = [self.live[lease.task] for lease in leases]
            self._do_start(good, [])
            self.check_all()
            self._do_finish(DRAINER, [(lease, Outcome.SUCCEEDED) for lease in good], [], [])
        else:
            raise AssertionError("the run does not drain: " + repr(self.store.counts()))
        self.check_all()
        counts = self.store.counts()
        assert sum(counts[s.label] for s in TERMINAL) == len(self.tasks), counts
        for r in self.store.tasks():
            assert State[r.state.upper()] in TERMINAL

    def check_all(self) -> None:
        self.store_agrees_with_model()
        self.one_live_lease_per_task()
        self.counts_add_up()


def contract_for(
    factory: StoreFactory,
    *,
    max_examples: int = 100,
    steps: int = 50,
    name: str = "StoreContract",
) -> type[unittest.TestCase]:
    """A ``unittest.TestCase`` running the stateful contract suite on stores from ``factory``.

    ``factory(path)`` builds a store in the existing, empty directory ``path`` (a fresh one for
    every example; it is removed afterwards). Its ``lease_s`` may be anything; ``10.0`` keeps
    the simulated clock's numbers readable.
    """
    if os.environ.get("PIPEFARM_FAST") == "1":  # make test-fast: the inner loop
        max_examples = min(max_examples, 10)
    machine = type(name, (StoreMachine,), {"store_factory": staticmethod(factory)})
    case = machine.TestCase
    case.settings = settings(
        max_examples=max_examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    return case


# --- example-based tests of the same contract ----------------------------------------------------------


def ok(lease: Lease, value, now: float) -> Finished:
    return Finished(lease.task, lease.token, int(Outcome.SUCCEEDED), now - 1, now,
                    result=pickle.dumps(value), exit_code=0)


def failed(lease: Lease, now: float, outcome: Outcome = Outcome.FAILED) -> Finished:
    return Finished(lease.task, lease.token, int(outcome), now - 1, now, error="boom", exit_code=1)


class ContractExamples:
    """Readable, example-based tests of the store contract. Subclass as ``Test...`` and set
    ``make_store`` to a callable ``(path) -> Store`` (``lease_s`` 10.0 expected)."""

    make_store: StoreFactory
    LEASE = 10.0

    @pytest.fixture
    def store(self, tmp_path):
        run = tmp_path / "run"
        run.mkdir(mode=0o700)
        s = type(self).make_store(str(run))
        assert s.lease_s == self.LEASE, "ContractExamples expects stores with lease_s=10.0"
        for w in ("a", "b"):
            s.register_worker(w, "host", 1, now=T0)
        yield s
        s.close()

    @staticmethod
    def spec(store: Store, **kw) -> int:
        kw.setdefault("backoff", 0.0)
        return store.add_spec(Spec(kind="py", payload=pickle.dumps("fn"), **kw))

    @staticmethod
    def state(store: Store, tid: int) -> str:
        return store.tasks(ids=[tid])[0].state

    @staticmethod
    def outcomes(store: Store, tid: int) -> list[str]:
        return [a.outcome for a in store.attempts(tid)]

    def run_one(self, store: Store, worker: str, now: float, value=None) -> Lease:
        (lease,) = store.claim(worker, 1, now=now)
        assert store.start([(lease.task, lease.token)], now=now) == 1
        assert store.finish(worker, [ok(lease, value, now)], now=now) == 1
        return lease

    def test_counts_every_state(self, store):
        counts = store.counts()
        assert set(LABELS) <= set(counts) and all(counts[label] == 0 for label in LABELS)
        sid = self.spec(store)
        ids = store.add_tasks(sid, [None] * 3)
        assert list(ids) == list(range(ids.start, ids.start + 3))
        assert store.counts()["ready"] == 3
        assert store.add_tasks(sid, [None]).start == ids.stop, "ids are dense"

    def test_claim_order_priority_then_cost_then_id(self, store):
        sid = self.spec(store)
        low = store.add_tasks(sid, [None, None], priority=0, cost=1.0)  # 2, 3
        cheap = store.add_tasks(sid, [None], priority=1, cost=0.5)  # 1
        dear = store.add_tasks(sid, [None], priority=1, cost=9.0)  # 0
        last = store.add_tasks(sid, [None], priority=-5, cost=100.0)  # 4
        order = [dear[0], cheap[0], low[0], low[1], last[0]]
        got = [store.claim("a", 1, now=T0)[0].task for _ in order]
        assert got == order
        assert store.claim("a", 1, now=T0) == []

    def test_claim_n_takes_the_best_n(self, store):
        sid = self.spec(store)
        ids = store.add_tasks(sid, [None] * 5)
        top = store.add_tasks(sid, [None], priority=3)
        leases = store.claim("a", 3, now=T0)
        assert sorted(lease.task for lease in leases) == sorted([top[0], ids[0], ids[1]])
        assert len({lease.token for lease in leases}) == 3
        assert all(self.state(store, lease.task) == "claimed" for lease in leases)
        assert store.tasks(ids=[top[0]])[0].worker == "a"

    def test_claim_respects_resources(self, store):
        big = store.add_spec(Spec(kind="py", payload=b"x", resources=Resources(cpus=4)))
        small = self.spec(store)
        (t_big,) = store.add_tasks(big, [None], priority=5)
        (t_small,) = store.add_tasks(small, [None])
        (lease,) = store.claim("a", 1, Resources(cpus=1), now=T0)
        assert lease.task == t_small
        assert store.claim("a", 1, Resources(cpus=1), now=T0) == []
        assert store.claim("b", 1, Resources(cpus=8), now=T0)[0].task == t_big

    def test_lease_carries_spec_and_args(self, store):
        sid = self.spec(store)
        args = pickle.dumps(((1, 2), {}))
        (tid,) = store.add_tasks(sid, [args], keys=["k1"])
        (lease,) = store.claim("a", 1, now=T0)
        assert (lease.task, lease.spec, lease.args) == (tid, sid, args)
        assert store.tasks(ids=[tid])[0].key == "k1"

    def test_success_records_the_result(self, store):
        sid = self.spec(store)
        (tid,) = store.add_tasks(sid, [None])
        self.run_one(store, "a", T0, value={"x": 1})
        state, blob, error = store.result(tid)
        assert state == "succeeded" and pickle.loads(blob) == {"x": 1} and error is None
        assert self.outcomes(store, tid)[-1] == "succeeded"

    def test_finish_needs_the_current_token(self, store):
        sid = self.spec(store)
        (tid,) = store.add_tasks(sid, [None])
        (lease,) = store.claim("a", 1, now=T0)
        assert store.start([(tid, lease.token + 1)], now=T0) == 0
        assert self.state(store, tid) == "claimed"
        store.start([(tid, lease.token)], now=T0)
        bogus = Finished(tid, lease.token + 1, int(Outcome.SUCCEEDED), T0, T0, result=b"no")
        assert store.finish("a", [bogus], now=T0) == 0
        assert self.state(store, tid) == "running"
        assert store.finish("a", [ok(lease, "yes", T0)], now=T0) == 1
        assert pickle.loads(store.result(tid)[1]) == "yes"

    def test_zombie_finish_is_a_stale_attempt(self, store):
        """Worker a's lease expires and b takes over; a's late result changes nothing."""
        sid = self.spec(store, max_lost=3)
        (tid,) = store.add_tasks(sid, [None])
        store.heartbeat("a", now=T0)
        (old,) = store.claim("a", 1, now=T0)
        store.start([(tid, old.token)], now=T0)
        t1 = T0 + self.LEASE + 1
        store.heartbeat("b", now=t1)
        assert store.reap(now=t1) == 1
        (new,) = store.claim("b", 1, now=t1)
        assert new.task == tid and new.token != old.token
        store.start([(tid, new.token)], now=t1)
        assert store.finish("a", [ok(old, "zombie", t1)], now=t1) == 0
        assert self.state(store, tid) == "running"
        assert store.tasks(ids=[tid])[0].worker == "b"
        assert store.finish("b", [ok(new, "current", t1 + 1)], now=t1 + 1) == 1
        assert store.finish("a", [ok(old, "zombie again", t1 + 2)], now=t1 + 2) == 0
        assert pickle.loads(store.result(tid)[1]) == "current"
        assert self.outcomes(store, tid).count("stale") == 2
        assert [a.token for a in store.attempts(tid) if a.outcome == "stale"] == [old.token] * 2
        row = store.tasks(ids=[tid])[0]
        assert (row.state, row.failures, row.lost) == ("succeeded", 0, 1)

    def test_reap_after_lease_expiry_is_a_lost_attempt(self, store):
        sid = self.spec(store, max_lost=2)
        (tid,) = store.add_tasks(sid, [None])
        store.heartbeat("a", now=T0)
        (lease,) = store.claim("a", 1, now=T0)
        store.start([(tid, lease.token)], now=T0)
        assert store.reap(now=T0 + self.LEASE / 2) == 0
        store.heartbeat("a", now=T0 + self.LEASE / 2)
        assert store.reap(now=T0 + self.LEASE + 1) == 0, "the heartbeat extended the lease"
        t1 = T0 + 2 * self.LEASE
        assert store.reap(now=t1) == 1
        row = store.tasks(ids=[tid])[0]
        assert (row.state, row.failures, row.lost) == ("ready", 0, 1)
        assert [a.outcome for a in store.attempts(tid) if a.token == lease.token] == ["lost"]
        # lost again: the lost budget (2) is spent
        store.heartbeat("b", now=t1 + 100)
        (again,) = store.claim("b", 1, now=t1 + 100)
        store.start([(tid, again.token)], now=t1 + 100)
        assert store.reap(now=t1 + 100, workers=["b"]) == 1
        row = store.tasks(ids=[tid])[0]
        assert (row.state, row.failures, row.lost) == ("failed", 0, 2)

    def test_reap_of_an_unstarted_lease_spends_nothing(self, store):
        sid = self.spec(store, max_lost=1)
        (tid,) = store.add_tasks(sid, [None])
        store.heartbeat("a", now=T0)
        (lease,) = store.claim("a", 1, now=T0)
        assert store.reap(now=T0 + self.LEASE + 1) == 1
        row = store.tasks(ids=[tid])[0]
        assert (row.state, row.failures, row.lost) == ("ready", 0, 0)
        # handed back unstarted: a released attempt, or no trace at all (as if never claimed)
        assert [a.outcome for a in store.attempts(tid) if a.token == lease.token] in (
            [], ["released"]
        )

    def test_release_spends_no_budget(self, store):
        sid = self.spec(store, max_attempts=1, max_lost=1, backoff=30.0)
        (tid,) = store.add_tasks(sid, [None])
        (lease,) = store.claim("a", 1, now=T0)
        store.start([(tid, lease.token)], now=T0)
        assert store.release("a", [(tid, lease.token)], now=T0) == 1
        row = store.tasks(ids=[tid])[0]
        assert (row.state, row.failures, row.lost) == ("ready", 0, 0)
        assert self.outcomes(store, tid) == ["released"]
        assert store.release("a", [(tid, lease.token)], now=T0) == 0  # not twice
        (again,) = store.claim("b", 1, now=T0)  # no backoff after a release
        store.start([(tid, again.token)], now=T0)
        assert store.finish("b", [failed(again, T0)], now=T0) == 1
        assert self.state(store, tid) == "failed"  # the one attempt was still there to spend

    def test_failure_retries_after_backoff(self, store):
        sid = self.spec(store, max_attempts=2, backoff=5.0)
        (tid,) = store.add_tasks(sid, [None])
        (lease,) = store.claim("a", 1, now=T0)
        store.start([(tid, lease.token)], now=T0)
        store.finish("a", [failed(lease, T0, Outcome.TIMED_OUT)], now=T0)
        row = store.tasks(ids=[tid])[0]
        assert (row.state, row.failures) == ("ready", 1)
        assert store.claim("a", 1, now=T0 + 4) == []
        (again,) = store.claim("a", 1, now=T0 + 6)
        store.start([(tid, again.token)], now=T0 + 6)
        store.finish("a", [failed(again, T0 + 6)], now=T0 + 6)
        row = store.tasks(ids=[tid])[0]
        assert (row.state, row.failures) == ("failed", 2)
        assert self.outcomes(store, tid) == ["timed_out", "failed"]

    def test_dependencies_release_in_order(self, store):
        sid = self.spec(store)
        (a,) = store.add_tasks(sid, [None])
        (b,) = store.add_tasks(sid, [None], after=[a], priority=9)
        assert self.state(store, b) == "blocked"
        (first,) = store.claim("a", 5, now=T0)
        assert first.task == a
        store.start([(a, first.token)], now=T0)
        store.finish("a", [ok(first, 1, T0)], now=T0)
        assert self.state(store, b) == "ready"
        (c,) = store.add_tasks(sid, [None], after=[a])
        assert self.state(store, c) == "ready", "a task whose dependencies succeeded is ready"

    def test_unknown_dependency_is_refused(self, store):
        sid = self.spec(store)
        (a,) = store.add_tasks(sid, [None])
        before = store.counts()
        with pytest.raises(ValueError):
            store.add_tasks(sid, [None, None], after=[a, a + 100])
        assert store.counts() == before
        assert store.add_tasks(sid, [None]).start == a + 1

    def test_cancel_skips_dependents(self, store):
        sid = self.spec(store)
        (a,) = store.add_tasks(sid, [None])
        (b,) = store.add_tasks(sid, [None], after=[a])
        (c,) = store.add_tasks(sid, [None], after=[b])
        (other,) = store.add_tasks(sid, [None])
        (lease,) = store.claim("a", 1, now=T0)
        assert lease.task == a
        store.cancel([a])
        assert [self.state(store, t) for t in (a, b, c, other)] == [
            "cancelled", "skipped", "skipped", "ready"
        ]
        # the holder's late finish changes nothing
        store.start([(a, lease.token)], now=T0)
        store.finish("a", [ok(lease, 1, T0)], now=T0)
        assert self.state(store, a) == "cancelled"
        (d,) = store.add_tasks(sid, [None], after=[a])
        assert self.state(store, d) == "skipped", "a dependency already ended unsuccessfully"

    def test_failure_for_good_skips_dependents(self, store):
        sid = self.spec(store, max_attempts=1)
        (a,) = store.add_tasks(sid, [None])
        (b,) = store.add_tasks(sid, [None], after=[a])
        (lease,) = store.claim("a", 1, now=T0)
        store.start([(a, lease.token)], now=T0)
        store.finish("a", [failed(lease, T0)], now=T0)
        assert (self.state(store, a), self.state(store, b)) == ("failed", "skipped")

    def test_retry_revives_skipped_dependents(self, store):
        sid = self.spec(store, max_attempts=1)
        (a,) = store.add_tasks(sid, [None])
        (b,) = store.add_tasks(sid, [None], after=[a])
        (c,) = store.add_tasks(sid, [None], after=[b])
        (lease,) = store.claim("a", 1, now=T0)
        store.start([(a, lease.token)], now=T0)
        store.finish("a", [failed(lease, T0)], now=T0)
        assert [self.state(store, t) for t in (a, b, c)] == ["failed", "skipped", "skipped"]
        store.retry()
        assert [self.state(store, t) for t in (a, b, c)] == ["ready", "blocked", "blocked"]
        assert store.tasks(ids=[a])[0].failures == 0, "a new attempt budget"
        for t in (a, b, c):
            lease = self.run_one(store, "a", T0 + 1)
            assert lease.task == t
        assert store.counts()["succeeded"] == 3

    def test_retry_leaves_succeeded_tasks_alone_by_default(self, store):
        sid = self.spec(store)
        (a,) = store.add_tasks(sid, [None])
        self.run_one(store, "a", T0, value="kept")
        store.retry()
        assert self.state(store, a) == "succeeded"
        store.retry([a], failed_only=False)
        assert self.state(store, a) == "ready"
        self.run_one(store, "b", T0 + 1, value="new")
        assert pickle.loads(store.result(a)[1]) == "new"

    # --- regressions found by the property suite ------------------------------------------------------
    def test_a_repeated_finish_takes_no_effect(self, store):
        """A worker re-sending a finish it already sent (say, after a timeout) changes nothing:
        in particular it must not count the task off its dependents a second time."""
        sid = self.spec(store)
        a, b = store.add_tasks(sid, [None, None])
        (c,) = store.add_tasks(sid, [None], after=[a, b])
        (la,) = store.claim("a", 1, now=T0)
        assert store.finish("a", [ok(la, 1, T0)], now=T0) == 1
        assert store.finish("a", [ok(la, 1, T0)], now=T0) == 0
        assert [self.state(store, t) for t in (a, b, c)] == ["succeeded", "ready", "blocked"]

    def test_a_stale_success_does_not_release_dependents(self, store):
        sid = self.spec(store)
        (a,) = store.add_tasks(sid, [None])
        (old,) = store.claim("a", 1, now=T0)
        store.start([(a, old.token)], now=T0)
        store.reap(now=T0, workers=["a"])  # a's worker declared dead: the task goes again
        (b,) = store.add_tasks(sid, [None], after=[a])
        (new,) = store.claim("b", 1, now=T0)
        store.start([(a, new.token)], now=T0)
        assert store.finish("a", [ok(old, "zombie", T0)], now=T0) == 0
        assert [self.state(store, t) for t in (a, b)] == ["running", "blocked"]
        assert store.finish("b", [ok(new, "current", T0)], now=T0) == 1
        assert [self.state(store, t) for t in (a, b)] == ["succeeded", "ready"]

    def test_every_ended_attempt_reports_its_token(self, store):
        sid = self.spec(store, max_attempts=1, max_lost=1)
        a, b = store.add_tasks(sid, [None, None])
        la, lb = store.claim("a", 2, now=T0)
        store.start([(a, la.token), (b, lb.token)], now=T0)
        store.finish("a", [failed(la, T0)], now=T0)  # failed for good
        store.reap(now=T0, workers=["a"])  # lb: lost for good
        assert [(r.outcome, r.token) for r in store.attempts(a)] == [("failed", la.token)]
        assert [(r.outcome, r.token) for r in store.attempts(b)] == [("lost", lb.token)]

    def test_tasks_limit_zero_is_no_rows(self, store):
        sid = self.spec(store)
        ids = store.add_tasks(sid, [None, None])
        assert store.tasks(limit=0) == []
        assert store.tasks(ids=list(ids), limit=0) == []
        assert [r.id for r in store.tasks(limit=1)] == [ids[0]]

    def test_retry_default_retries_failed_and_revives_their_dependents(self, store):
        """Store.retry: "By default the failed tasks"; skipped dependents come back."""
        sid = self.spec(store, max_attempts=1)
        (a,) = store.add_tasks(sid, [None])
        (b,) = store.add_tasks(sid, [None], after=[a])
        (c,) = store.add_tasks(sid, [None])
        (lease,) = store.claim("a", 1, now=T0)
        store.start([(a, lease.token)], now=T0)
        store.finish("a", [failed(lease, T0)], now=T0)
        store.cancel([c])
        assert [self.state(store, t) for t in (a, b, c)] == ["failed", "skipped", "cancelled"]
        store.retry()
        assert [self.state(store, t) for t in (a, b, c)] == ["ready", "blocked", "cancelled"]
        store.retry(failed_only=False)
        assert self.state(store, c) == "ready"

    def test_retry_never_blocks_a_task_on_an_unsuccessful_dependency(self, store):
        """A retried task whose dependency ended unsuccessfully (and is not retried with it)
        cannot run: it stays skipped rather than wait for ever."""
        sid = self.spec(store)
        (a,) = store.add_tasks(sid, [None])
        (b,) = store.add_tasks(sid, [None], after=[a])
        store.cancel([a])
        store.retry([b])
        assert [self.state(store, t) for t in (a, b)] == ["cancelled", "skipped"]
        store.retry([a])
        assert [self.state(store, t) for t in (a, b)] == ["ready", "blocked"]

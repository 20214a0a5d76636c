"""The coordinator: feeds a store's ready tasks to workers it reaches through a transport.

It is the store's only writer. It leases ready tasks in batches of about ``batch_target_s`` of
work, sized from the durations measured for each spec (function or command), splits what it
leases evenly over the workers that want work, queues a second batch behind short ones only when
no worker is idle, and lets an idle worker take over the unstarted tail of a busy one
(:class:`~pipefarm.worker.Revoke`). It commits outcomes in batches, enforces timeouts by killing
the worker whose task overran (and starting a new one), turns a dead worker's task into a
``lost`` (or, for a Python task that crashed its worker, ``failed``) attempt, applies the halt
policy, and stops cleanly on SIGINT/SIGTERM or ``hooks.stop``.

How workers are started and reached is the :class:`~pipefarm.backends.transport.Transport`'s
business (:mod:`pipefarm.backends.local.transport` for processes on this host)::

    store                        Coordinator                       Transport        workers
    -----                        -----------                       ---------        -------
    lease_ready() ----leases---> _hand_out / _split
                                 (batch sizing: spec_s)
                                 _send -----Batch bytes----------> send(link) ----> run tasks,
                                 _steal ----Revoke bytes---------> send(link) ----> publish
                                                                                    current task
                                 _mark_running <--(task, since)--- current(slot) <-- (slots)
    start_leased() <-----------'
                                 _on_message <---Done/Revoked----- ready/receive <-- report
                                 (pending_ok / pending_other)
    finish_leased() <--_commit--'  (every commit_every_s)
                                 _check_timeouts --------------->  kill(link)
                                 _on_worker_exit <--gone---------- receive -> None,
                                 (_abandon: lost/failed,           exit_status(link)
    release() <------------------ the rest released) ---------->   start(slot): replacement
    counts() ----> _progress ----> hooks.on_progress

It stays one module (about 900 lines) because every method reads and writes the same loop
state -- the workers' outstanding batches, the in-flight leases, the pending commits -- and
cutting it would pass that state around instead of keeping it in one place.
"""

from __future__ import annotations

import collections
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..cache.serve import CACHE_WORKER, LeaseCache
from ..states import TERMINAL, Outcome
from ..store.base import Store
from ..task import PY, Finished, Lease, Resources, Spec, signal_label
from ..worker import Batch, Done, Revoke, Revoked, from_worker_decoder
from .base import Hooks, Summary
from .transport import Transport

#: ``fail=N%`` is judged only once at least this many tasks have ended in the run being
#: halted (GNU parallel judges from the first job): with fewer, one early failure among the
#: first three would already be 33% and halt a sweep whose failure rate is 1%.
HALT_PERCENT_MIN_ENDED = 10

#: A busy worker that has sent nothing for this long while holding leases it may not have
#: started is asked to hand some back when a worker is idle and nothing is ready. Same value as
#: the worker's FLUSH_AFTER_S: a batch sized for ``batch_target_s`` (20 ms) that is still
#: silent after 50 ms was estimated wrong; a steal costs one round trip (well under 1 ms).
STEAL_AFTER_S = 0.05

#: A second batch is queued behind a worker's current one only for specs measured shorter than
#: this, to hide the round trip between batches; for longer tasks it would only hold work back
#: from a worker that becomes idle (the cut-off the single run-wide estimate used before; W3's
#: 20 ms tasks keep their efficiency with it).
PREFETCH_BELOW_S = 0.5

#: ``Revoke.thieves`` that takes back every unstarted lease of a worker (halt soon).
HALT_TAKE_ALL = 1 << 30

#: How long one loop turn waits for a worker's message before it commits, checks timeouts and
#: reports progress: short enough that a commit is never late by more than this next to
#: ``commit_every_s`` (50 ms).
RECEIVE_WAIT_S = 0.02

_TERMINAL_LABELS = frozenset(s.label for s in TERMINAL)

#: Signals a process raises against itself when its code goes wrong: a worker that dies of one
#: while running a Python task was crashed by that task (a C extension's segfault, abort()).
CRASH_SIGNALS = frozenset(
    int(s) for s in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE,
                     signal.SIGILL, signal.SIGSYS, signal.SIGTRAP)
)

_SIGNAL_WORDS = {
    int(signal.SIGSEGV): "segmentation fault", int(signal.SIGABRT): "aborted",
    int(signal.SIGBUS): "bus error", int(signal.SIGFPE): "floating-point exception",
    int(signal.SIGILL): "illegal instruction",
}


class HaltPolicy(msgspec.Struct, frozen=True):
    """When to stop a run early because tasks fail (GNU parallel's ``--halt``).

    ``when`` is ``"soon"`` (stop handing out tasks; the running ones finish) or ``"now"``
    (stop at once; running tasks are released, spending no retry). ``fail`` is a number of
    tasks that failed for good (after their retries) during this run, or with ``percent`` the
    share of the tasks that ended during it, judged from :data:`HALT_PERCENT_MIN_ENDED` on.
    """

    when: str
    fail: float
    percent: bool = False

    @classmethod
    def parse(cls, text: str | HaltPolicy) -> HaltPolicy:
        """``"soon,fail=3"``, ``"now,fail=1"``, ``"soon,fail=10%"`` -> a policy.

        Raises ValueError naming what is wrong.
        """
        if isinstance(text, HaltPolicy):
            return text
        when, _, rule = str(text).replace(" ", "").partition(",")
        key, _, value = rule.partition("=")
        if when not in ("soon", "now") or key != "fail" or not value:
            raise ValueError(f"--halt {text!r}: expected soon,fail=N or now,fail=N (N a count"
                             " >= 1 or a percentage like 10%)")
        percent = value.endswith("%")
        try:
            n = float(value[:-1]) if percent else int(value)
        except ValueError:
            n = -1
        if not (0 < n <= 100 if percent else n >= 1):
            raise ValueError(f"--halt {text!r}: fail= takes a count >= 1 or a percentage in"
                             " (0, 100]")
        return cls(when, n, percent)

    def __str__(self) -> str:
        n = f"{self.fail:g}%" if self.percent else f"{int(self.fail)}"
        return f"{self.when},fail={n}"

    def reached(self, failed: int, ended: int) -> bool:
        """Whether ``failed`` failures among ``ended`` ended tasks trip the policy."""
        if self.percent:
            return ended >= HALT_PERCENT_MIN_ENDED and failed * 100 >= self.fail * ended
        return failed >= self.fail


def describe_worker_death(status: int | None, kind: str | None) -> tuple[Outcome, str, int | None]:
    """How the running task's attempt ends when its worker process died with ``status``.

    ``status`` is the worker's exit status (``-N``: killed by signal N; None: unknown) and
    ``kind`` the kind of task it was running (None: none). A Python task runs inside its
    worker, so a crash signal or an exit of the worker is that task's doing: a failed attempt
    that names the signal or exit code. A kill from outside (SIGKILL: most often the kernel's
    out-of-memory killer; SIGTERM, ...) is a loss: the task runs again without spending a retry.
    """
    if status is not None and status < 0:
        sig = -status
        name = signal_label(sig)
        if sig in CRASH_SIGNALS and kind == PY:
            desc = _SIGNAL_WORDS.get(sig, "")
            return (Outcome.FAILED, f"crashed: the task killed its worker process with {name}"
                    + (f" ({desc})" if desc else ""), status)
        if sig == signal.SIGKILL:
            return Outcome.LOST, "lost: its worker process was killed (SIGKILL; out of memory?)", status
        return Outcome.LOST, f"lost: its worker process was killed ({name})", status
    if status is not None and kind == PY:
        return (Outcome.FAILED, f"crashed: the task ended its worker process (exit code"
                f" {status})", status)
    if status is not None:
        return Outcome.LOST, f"lost: its worker process exited with code {status}", status
    return Outcome.LOST, "lost: its worker process died (killed, or crashed the interpreter)", None


@dataclass(frozen=True)
class Options:
    """The coordinator's settings (a backend's options, less how workers are reached)."""

    n: int  # at most this many workers at once
    batch_target_s: float = 0.02  # seconds of measured work per batch
    max_batch: int = 4096  # tasks per batch at most, however short they are
    heartbeat_s: float = 10.0  # how often live workers' heartbeats are recorded
    commit_every_s: float = 0.05  # outcomes are committed at least this often
    halt: HaltPolicy | None = None
    gpus_available: list[str] | None = None  # None: the GPUs detected on this host
    # GPUs each slot holds of its own, assigned and made visible by the engine (Ray gives each
    # actor its CUDA_VISIBLE_DEVICES): a task needing up to this many runs on any idle slot and
    # sees the slot's devices; the coordinator hands none out itself
    slot_gpus: int = 0


class Tuned:
    """What every backend under the coordinator keeps of its options (local, mpi, dask, ray):
    the coordinator's tuning and halt policy, and the :class:`Options` built from them."""

    halt: HaltPolicy | None

    def _keep_tuning(self, batch_target_s: float, max_batch: int, heartbeat_s: float,
                     commit_every_s: float, halt: str | HaltPolicy | None) -> None:
        self.halt = None if halt is None else HaltPolicy.parse(halt)
        self.batch_target_s = batch_target_s
        self.max_batch = max_batch
        self.heartbeat_s = heartbeat_s
        self.commit_every_s = commit_every_s

    def _options(self, n: int, gpus_available: list[str] | None, slot_gpus: int = 0) -> Options:
        """The coordinator's settings for ``n`` workers handing out ``gpus_available`` (or,
        with ``slot_gpus``, each slot holding that many GPUs the engine assigned it)."""
        return Options(n, self.batch_target_s, self.max_batch, self.heartbeat_s,
                       self.commit_every_s, self.halt, gpus_available, slot_gpus)


@dataclass
class _Slot:
    """The coordinator's view of one worker (the transport knows it by ``link``)."""

    index: int  # its slot: the transport's cell that says what it runs
    id: str  # its worker id in the store
    pid: int
    link: Any  # what the transport reaches it by
    # batches sent and not finished: (batch id, leases, sent at, cpus held, gpus held)
    outstanding: collections.deque = field(default_factory=collections.deque)
    specs_sent: set[int] = field(default_factory=set)  # specs it has: sent once per worker
    alive: bool = True
    # batch id -> [leases neither reported nor handed back, spec id or -1 when mixed]
    batches: dict[int, list[int]] = field(default_factory=dict)
    revoking: bool = False  # a Revoke is on its way: no second one, no more work until answered
    heard: float = field(default_factory=time.monotonic)  # last message from it or batch to it


class Coordinator:
    """One ``execute`` call's loop: see the module docstring. Use once: :meth:`run`."""

    def __init__(self, opts: Options, transport: Transport, store: Store, hooks: Hooks) -> None:
        self.opts = opts
        self.transport = transport
        self.store = store
        self.run_dir = hooks.run_dir
        self.on_progress = hooks.on_progress
        self.feed = hooks.feed
        self.on_finished = hooks.on_finished
        self.on_dispatch = hooks.on_dispatch
        self.stop_event = hooks.stop
        # the workers by slot index (a replacement takes its dead predecessor's place)
        self.workers: list[_Slot] = []
        # committed-but-not-yet outcomes per worker: plain success rows, and everything else
        self.pending_ok: dict[str, list[tuple]] = collections.defaultdict(list)
        self.pending_other: dict[str, list[Finished]] = collections.defaultdict(list)
        self.n_pending = 0  # outcomes in pending_ok and pending_other together
        # leases live in memory (see SQLiteStore.lease_ready): ids leased and not yet committed
        self.inflight: set[int] = set()
        # where the next lease_ready search starts (None: from the top)
        self.cursor: tuple[int, float, int] | None = None
        self.last_commit = time.monotonic()  # when _commit last wrote
        self.batch_id = 0  # the id of the latest batch sent (ids are per coordinator)
        # measured seconds per task, per spec (an EWMA): batches are sized from these, so the
        # history of one function never sizes the batches of another
        self.spec_s: dict[int, float] = {}
        self.last_spec: int | None = None  # the spec of the latest task leased
        self.specs: dict[int, Spec] = {}  # specs read from the store, by id
        self.spec_blobs: dict[int, bytes] = {}  # the same, encoded once for every worker
        # nothing was ready at the last look: no new lease_ready before this (monotonic) time
        self.dry_until = 0.0
        self.attempts = 0  # attempts that ended (were committed) during this call
        self.interrupted: str | None = None  # what stopped the run: a signal's name, "stop"
        # when workers died (monotonic): many deaths at start with no attempt ended is fatal
        self.deaths: collections.deque = collections.deque(maxlen=64)
        # the counts by state as last read from the store, kept up to date between reads for
        # plain successes; stale (read again) after anything else
        self.counts: dict[str, int] = {}
        self.counts_stale = True
        self.last_counts = 0.0  # when counts were last read (monotonic)
        self.feeding = self.feed is not None  # the feed may still add tasks
        # fed tasks arrive one by one: workers start as they are needed, up to opts.n
        self.lazy = self.feed is not None
        self.gpu_pool: Any = None  # a DevicePool when this host has GPUs
        # a spec needs several CPUs or GPUs: tasks then go one by one, as resources allow
        self.resourceful = False
        self.cpus_free = opts.n  # CPUs not held by a running task (counted when resourceful)
        self.marked: set[int] = set()  # leased tasks recorded as running in the store
        # the halt policy: failures and ended tasks counted from this call's start
        self.halted: str | None = None  # why the policy stopped the run
        self.halt_base: dict[str, int] = {}  # the counts when the call started
        self.halt_failed = 0
        self.halt_ended = 0
        # the result cache: leased tasks it holds are committed as cached attempts (rows and
        # large results, like pending_ok and pending_other), never dispatched
        self.cache = (LeaseCache(self._spec, store.cache_keys)
                      if hasattr(store, "cache_keys") else None)
        self.cached_ok: list[tuple] = []
        self.cached_large: list[Finished] = []

    # --- workers ---------------------------------------------------------------------------------
    def _start(self, index: int) -> _Slot:
        """Start a worker in slot ``index`` and register it in the store."""
        wid, pid, link = self.transport.start(index)
        self.store.register_worker(wid, self.transport.host, pid)
        return _Slot(index, wid, pid, link)

    def _start_workers(self) -> None:
        """Start one worker per task that could run, at most ``opts.n`` (when fed, none: they
        start as tasks arrive). A stop signal ends the starting at once."""
        if self.lazy:
            return
        runnable = sum(v for k, v in self.counts.items() if k not in _TERMINAL_LABELS)
        want = min(self.opts.n, runnable)
        with self.store.transaction():  # one commit for every worker's registration
            for i in range(want):
                if self._stop_asked():
                    break
                try:
                    self.workers.append(self._start(i))
                except OSError as exc:  # out of processes or file descriptors
                    if not self.workers:
                        raise
                    warnings.warn(f"started {len(self.workers):,} of {want:,} workers: {exc}",
                                  RuntimeWarning, stacklevel=2)
                    break

    def _stop_asked(self) -> bool:
        if self.stop_event is not None and self.stop_event.is_set() and not self.interrupted:
            self.interrupted = "stop"
        return bool(self.interrupted)

    # --- batches ---------------------------------------------------------------------------------
    def _per_batch(self, sid: int | None) -> int:
        """How many tasks of spec ``sid`` make about ``batch_target_s`` of work (1 until one of
        them was measured: one task, then sized from what it took)."""
        est = self.spec_s.get(sid) if sid is not None else None
        if est is None:
            return 1
        return max(1, min(self.opts.max_batch, int(self.opts.batch_target_s / max(est, 1e-7))))

    def _short(self, sid: int | None) -> bool:
        est = self.spec_s.get(sid) if sid is not None else None
        return est is not None and est < PREFETCH_BELOW_S

    def _spec(self, sid: int) -> Spec:
        spec = self.specs.get(sid)
        if spec is None:
            spec = self.specs[sid] = self.store.spec(sid)
            self.spec_blobs[sid] = msgspec.msgpack.encode(spec)
            r = spec.resources
            if r.cpus > 1 or r.gpus > 0:
                self.resourceful = True
        return spec

    def _dispatch(self) -> bool:
        """Hand ready tasks to the workers that want work (or ask busy ones to hand some back
        for idle ones); True when there was work to hand out."""
        if self.interrupted or self.halted:
            return False
        if self.resourceful:
            return any([self._fill_resourceful(w) for w in list(self.workers)])
        sent = False
        if time.monotonic() >= self.dry_until:
            idle = [w for w in self.workers if w.alive and not w.outstanding]
            spare = self.opts.n - len(self.workers) if self.lazy else 0
            if idle or spare > 0:
                sent = self._hand_out(idle, spare)
            elif self._short(self.last_spec):
                # every worker is busy with short tasks: a second batch behind the current one
                # saves the round trip between them
                one = [w for w in self.workers if w.alive and len(w.outstanding) == 1
                       and not w.revoking]
                if one:
                    sent = self._hand_out(one, 0)
        if not sent and time.monotonic() < self.dry_until:
            self._steal()
        return sent

    def _hand_out(self, targets: list[_Slot], spare: int) -> bool:
        """Lease work for ``targets`` and ``spare`` workers not started yet, split evenly over
        them (starting workers for the shares beyond ``targets``); False when nothing was
        ready (True even when a worker turned out dead: its share is ready again)."""
        k = len(targets) + spare
        n, served = self._per_batch(self.last_spec) * k, False
        while True:
            leases, cursor = self.store.lease_ready(n, self.inflight, self.cursor)
            if not leases or self.cache is None:
                break
            leases = self._serve_cached(leases)
            if leases:
                break
            # every one was served by the cache: the next ones may be too, in full batches
            self.cursor, n, served = cursor, self.opts.max_batch, True
        if not leases:
            self.dry_until = time.monotonic() + 0.1
            return served
        chunks, whole = self._split(leases, k)
        # what was left out lies before the returned cursor: search from the top next time
        self.cursor = cursor if whole else None
        sids = {sid for _, sid in chunks}
        for s in {lz.spec for lz in leases} if -1 in sids else sids:
            self._spec(s)  # learns whether the spec needs several CPUs or GPUs
        if self.resourceful:  # a spec that needs several CPUs or GPUs: they go one by one
            self.cursor = None  # (leases in memory only: dropping them leaves them ready)
            return True
        for i, (chunk, sid) in enumerate(chunks):
            if i < len(targets):
                w = targets[i]
            else:
                if self._stop_asked():  # starting many workers: a stop signal ends it at once
                    self.cursor = None
                    break
                try:
                    w = self._start(len(self.workers))
                except OSError as exc:  # out of processes or file descriptors
                    if not any(x.alive for x in self.workers):
                        raise
                    warnings.warn(f"cannot start more than {len(self.workers):,} workers: {exc}",
                                  RuntimeWarning, stacklevel=2)
                    self.lazy = False
                    self.cursor = None
                    break
                self.workers.append(w)
            self._send(w, chunk, sid)
        return True

    def _serve_ready_from_cache(self) -> None:
        """Before any worker starts: commit every ready task the result cache holds as a
        cached attempt, in one lookup and one transaction (a fully cached rerun starts no
        worker), and hold the ones whose key another ready task will compute."""
        if self.cache is None or not any(self._spec(sid).cache is not None for sid, _, _
                                         in self.store.pending_spec_resources()):
            return
        ready = self.store.ready_cache_keys()
        if not ready:
            return
        assert self.cache is not None
        rows, large, held = self.cache.prepass(ready)
        self.inflight.update(held)
        if rows or large:
            with self.store.transaction():
                self.store.finish_leased(CACHE_WORKER, rows, large, outcome=Outcome.CACHED)
            self.attempts += len(rows) + len(large)

    def _serve_cached(self, leases: list[Lease]) -> list[Lease]:
        """Commit (with the next commit) the leased tasks the result cache holds, as cached
        attempts; hold those whose key another task is computing; return the rest."""
        assert self.cache is not None
        if all(self._spec(s).cache is None for s in {lz.spec for lz in leases}):
            return leases
        out, rows, large = self.cache.sort(leases)
        if len(out) != len(leases):
            kept = {lz.task for lz in out}
            self.inflight.update(lz.task for lz in leases if lz.task not in kept)
            self._add_cached(rows, large)
        return out

    def _add_cached(self, rows: list[tuple], large: list[Finished]) -> None:
        self.cached_ok += rows
        self.cached_large += large
        self.n_pending += len(rows) + len(large)

    def _split(self, leases: list[Lease], k: int) -> tuple[list[tuple[list[Lease], int]], bool]:
        """Cut ``leases`` (in claim order) into at most ``k`` batches of about equal measured
        work, each about ``batch_target_s``; the batches with their spec (-1: mixed), and
        whether every lease was used."""
        sids = {lz.spec for lz in leases}
        if len(sids) == 1:
            sid = leases[0].spec
            keep = leases[: self._per_batch(sid) * k]
            q, r = divmod(len(keep), k)
            chunks, at = [], 0
            for i in range(min(k, len(keep))):
                size = q + (i < r)
                chunks.append((keep[at:at + size], sid))
                at += size
        else:
            keep, parts = self._split_mixed(leases, k)
            chunks = [(p, p[0].spec if all(lz.spec == p[0].spec for lz in p) else -1)
                      for p in parts]
        self.last_spec = keep[-1].spec
        return chunks, len(keep) == len(leases)

    def _split_mixed(self, leases: list[Lease], k: int) -> tuple[list[Lease], list[list[Lease]]]:
        """Leases of several specs: keep about ``k`` batches' worth by each spec's measured
        duration and cut them into at most ``k`` contiguous parts of about equal work."""
        target = self.opts.batch_target_s
        costs: list[float] = []
        total = 0.0
        for lz in leases:
            if total >= target * k and len(costs) >= k:
                break
            # unmeasured: a batch's worth, so that it goes (nearly) alone until measured
            c = self.spec_s.get(lz.spec, target)
            costs.append(c)
            total += c
        keep = leases[: len(costs)]
        share = total / k
        parts: list[list[Lease]] = [[]]
        acc = 0.0
        for lz, c in zip(keep, costs, strict=True):
            if parts[-1] and acc + c / 2 > share and len(parts) < k:
                parts.append([])
                acc = 0.0
            parts[-1].append(lz)
            acc += c
        return keep, parts

    def _send(self, w: _Slot, leases: list[Lease], sid: int, env: dict[str, str] | None = None,
              held_cpus: int = 1, held_gpus: list[str] | None = None) -> bool:
        """Send ``leases`` (all of spec ``sid``, or -1) to ``w`` as one batch. False when ``w``
        turned out to be dead: a lost worker (its leases go back, it is replaced)."""
        held_gpus = held_gpus or []
        specs = {}
        for s in ((sid,) if sid >= 0 else {lz.spec for lz in leases}):
            if s not in w.specs_sent:
                self._spec(s)
                specs[s] = self.spec_blobs[s]
                w.specs_sent.add(s)
        self.inflight.update(lz.task for lz in leases)
        self.batch_id += 1
        bid = self.batch_id
        now = time.monotonic()
        w.outstanding.append((bid, leases, now, held_cpus, held_gpus))
        w.batches[bid] = [len(leases), sid]
        w.heard = now
        if self.resourceful:
            self.cpus_free -= held_cpus
        if not self.transport.send(w.link, msgspec.msgpack.encode(Batch(bid, leases, specs, env))):
            self._on_worker_exit(w)  # it died since we last heard of it: a lost worker
            return False
        if self.on_dispatch is not None:
            self.on_dispatch(leases)
        return True

    def _fill_resourceful(self, w: _Slot) -> bool:
        """Tasks that need several CPUs or GPUs go one at a time, as the resources allow."""
        now = time.monotonic()
        if now < self.dry_until or not w.alive or w.outstanding or self.cpus_free < 1:
            return False
        gpus_free = self.gpu_pool.free_count() if self.gpu_pool else self.opts.slot_gpus
        leases, _ = self.store.lease_ready(
            1, self.inflight, None, Resources(cpus=self.cpus_free, gpus=gpus_free))
        if not leases:
            self.dry_until = now + 0.1
            return False
        if self.cache is not None and not self._serve_cached(leases):
            return True  # served by the result cache (or held behind its twin)
        spec = self._spec(leases[0].spec)
        env, held_gpus = self._devices_for(spec)
        return self._send(w, leases, leases[0].spec, env, max(1, spec.resources.cpus), held_gpus)

    def _steal(self) -> None:
        """Idle workers and nothing ready: workers quiet for a while that may hold unstarted
        leases are asked to hand some back (a Revoke); those get leased again at once."""
        if self.resourceful:
            return
        idle = [w for w in self.workers if w.alive and not w.outstanding]
        if not idle:
            return
        now = time.monotonic()
        victims = []
        for w in self.workers:
            if w.alive and w.outstanding and not w.revoking and now - w.heard > STEAL_AFTER_S:
                left = sum(b[0] for b in w.batches.values())
                if left >= 2:  # one of them is running; the others may not have started
                    victims.append((left, w))
        if not victims:
            return
        victims.sort(key=lambda v: -v[0])
        chosen = victims[: len(idle)]
        thieves = max(1, len(idle) // len(chosen))
        for _, w in chosen:
            if not self.transport.send(w.link, msgspec.msgpack.encode(Revoke(thieves))):
                self._on_worker_exit(w)
                continue
            w.revoking = True
            w.heard = now

    def _devices_for(self, spec: Spec) -> tuple[dict[str, str] | None, list[str]]:
        """GPUs for one task and the environment that confines it to them."""
        if self.gpu_pool is None:
            return None, []
        devs: list[str] = []
        if spec.resources.gpus > 0:
            devs = list(self.gpu_pool.acquire(spec.resources.gpus) or [])
        return self.gpu_pool.env(devs), devs

    def _release_resources(self, held_cpus: int, held_gpus: list[str]) -> None:
        if self.resourceful:
            self.cpus_free += held_cpus
        if held_gpus and self.gpu_pool is not None:
            self.gpu_pool.release(held_gpus)

    # --- results ---------------------------------------------------------------------------------
    def _on_message(self, w: _Slot, msg: Done | Revoked) -> None:
        w.heard = time.monotonic()
        if isinstance(msg, Revoked):
            self._on_revoked(w, msg.tasks)
        else:
            self._on_done(w, msg)

    def _on_done(self, w: _Slot, done: Done) -> None:
        info = w.batches.get(done.id)
        if info is None:
            return  # a batch we already gave up on
        if done.ok:
            self.pending_ok[w.id].extend(done.ok)
        if done.others:
            self.pending_other[w.id].extend(done.others)
        n = len(done.ok) + len(done.others)
        if not n:
            return
        self.n_pending += n
        if info[1] >= 0:
            self._learn(info[1], done.busy / n)
        else:
            self._learn_mixed(w, done)
        info[0] -= n
        if info[0] <= 0:
            self._batch_done(w, done.id)

    def _learn(self, sid: int, seconds: float) -> None:
        seconds = max(seconds, 2e-6)
        old = self.spec_s.get(sid)
        self.spec_s[sid] = seconds if old is None else 0.7 * old + 0.3 * seconds

    def _learn_mixed(self, w: _Slot, done: Done) -> None:
        """A batch of several specs: each learns from its own tasks' durations."""
        leases = next((e[1] for e in w.outstanding if e[0] == done.id), [])
        spec_of = {lz.task: lz.spec for lz in leases}
        sums: dict[int, list[float]] = collections.defaultdict(lambda: [0.0, 0])
        for r in done.ok:
            s = sums[spec_of.get(r[0], -1)]
            s[0] += r[4] - r[3]
            s[1] += 1
        for f in done.others:
            s = sums[spec_of.get(f.task, -1)]
            s[0] += f.ended_at - f.started_at
            s[1] += 1
        for sid, (total, n) in sums.items():
            if sid >= 0:
                self._learn(sid, total / n)

    def _batch_done(self, w: _Slot, bid: int) -> None:
        """Every lease of batch ``bid`` was reported or handed back."""
        del w.batches[bid]
        for i, entry in enumerate(w.outstanding):
            if entry[0] == bid:
                del w.outstanding[i]
                self._release_resources(entry[3], entry[4])
                return

    def _on_revoked(self, w: _Slot, tasks: list[int]) -> None:
        """``w`` handed back ``tasks``: it never started them and never will."""
        w.revoking = False
        if not tasks:
            return
        back = set(tasks)
        for entry in list(w.outstanding):
            leases = entry[1]
            kept = [lz for lz in leases if lz.task not in back]
            if len(kept) != len(leases):
                info = w.batches[entry[0]]
                info[0] -= len(leases) - len(kept)
                leases[:] = kept
                if info[0] <= 0:
                    self._batch_done(w, entry[0])
        # leases live in memory only: dropping them makes the tasks ready for the idle workers
        self.inflight.difference_update(back)
        if self.cache is not None:  # and the tasks held behind them in the cache
            self.inflight.difference_update(self.cache.dropped(back))
        self.cursor = None
        self.dry_until = 0.0

    def _commit(self, force: bool = False) -> None:
        if not self.n_pending:
            return
        now = time.monotonic()
        if not force and self.n_pending < 20000 and now - self.last_commit < self.opts.commit_every_s:
            return
        all_ok: list[tuple] = []
        all_other: list[Finished] = []
        with self.store.transaction():
            for wid in set(self.pending_ok) | set(self.pending_other):
                ok = self.pending_ok.pop(wid, [])
                other = self.pending_other.pop(wid, [])
                self.store.finish_leased(wid, ok, other)
                all_ok += ok
                all_other += other
            ran = (list(all_ok), list(all_other)) if self.cache is not None and self.cache.pending else None
            if self.cached_ok or self.cached_large:
                self.store.finish_leased(CACHE_WORKER, self.cached_ok, self.cached_large,
                                         outcome=Outcome.CACHED)
                all_ok += self.cached_ok
                all_other += self.cached_large
                self.cached_ok, self.cached_large = [], []
        self.inflight.difference_update(r[0] for r in all_ok)
        self.inflight.difference_update(f.task for f in all_other)
        self.n_pending = 0
        if ran is not None:  # successes go into the cache; tasks held behind them are served
            rows, large, free = self.cache.committed(*ran)
            self._add_cached(rows, large)
            self.inflight.difference_update(free)
        self.last_commit = now
        self.dry_until = 0.0
        self.attempts += len(all_ok) + len(all_other)
        if all_other or self.store.has_deps():
            self.cursor = None  # a retry or an unblocked dependent may be ready before the cursor
            self.counts_stale = True
        elif self.counts:
            self._count_successes([r[0] for r in all_ok])
        if self.on_finished is not None:
            self.on_finished(all_ok, all_other)
        if self.opts.halt is not None and not self.halted:
            self._check_halt(len(all_ok), bool(all_other))
        self._progress()

    def _count_successes(self, tasks: list[int]) -> None:
        """Move plain successes into ``counts`` without reading the store: each came from
        ``running`` when it was recorded as started (:meth:`_mark_running`), from ``ready``
        otherwise (leases live in memory: a leased task is still ready in the store)."""
        started = sum(1 for t in tasks if t in self.marked)
        self.counts["succeeded"] = self.counts.get("succeeded", 0) + len(tasks)
        self.counts["running"] = max(0, self.counts.get("running", 0) - started)
        self.counts["ready"] = max(0, self.counts.get("ready", 0) - (len(tasks) - started))

    def _halt_now(self) -> bool:
        return self.opts.halt is not None and self.opts.halt.when == "now"

    def _check_halt(self, n_ok: int, others: bool) -> None:
        """Apply the halt policy after a commit. Only a commit with unsuccessful outcomes
        pays for a count of the catalog (whether a failure was the task's last try is the
        store's to say); plain successes just add to the tasks that ended."""
        halt = self.opts.halt
        assert halt is not None
        if others:
            c = self.store.counts()
            self.halt_failed = c.get("failed", 0) - self.halt_base.get("failed", 0)
            self.halt_ended = self.halt_failed + c.get("succeeded", 0) - self.halt_base.get(
                "succeeded", 0)
        else:
            self.halt_ended += n_ok
        if not self.halt_failed or not halt.reached(self.halt_failed, self.halt_ended):
            return
        share = (f" of {self.halt_ended:,} ended ({100 * self.halt_failed / self.halt_ended:.0f}%)"
                 if halt.percent else "")
        self.halted = f"{self.halt_failed:,} task(s) failed{share} (halt {halt})"
        if halt.when == "soon":  # running tasks finish; unstarted leases come back at once
            for w in self.workers:
                if w.alive and w.outstanding and not w.revoking:
                    if self.transport.send(w.link, msgspec.msgpack.encode(Revoke(HALT_TAKE_ALL))):
                        w.revoking = True

    def _progress(self, final: bool = False) -> None:
        if self.on_progress is None:
            return
        now = time.monotonic()
        if self.counts_stale and (final or now - self.last_counts > 1.0):
            self.counts = self.store.counts()
            self.counts_stale = False
            self.last_counts = now
        shown = dict(self.counts)
        running = sum(1 for w in self.workers if w.alive and w.outstanding)
        shown["running"] = running
        self.on_progress(shown)

    # --- failures of workers ---------------------------------------------------------------------
    def _abandon(self, w: _Slot, current_outcome: Outcome | None, note: str,
                 exit_code: int | None = None) -> None:
        """``w`` is gone: its current task gets ``current_outcome``, the rest are released."""
        current, started = self.transport.current(w.index)
        self.transport.clear(w.index)
        now = time.time()
        to_release: list[tuple[int, int]] = []
        for _, leases, _, cpus, gpus in w.outstanding:
            self._release_resources(cpus, gpus)
            for lease in leases:
                if lease.task == current and current_outcome is not None:
                    self.pending_other[w.id].append(
                        Finished(lease.task, lease.token, int(current_outcome), started or now, now,
                                 error=note, exit_code=exit_code, attempt=lease.attempt)
                    )
                    self.n_pending += 1
                else:
                    to_release.append((lease.task, lease.token))
        w.outstanding.clear()
        self._commit(force=True)
        # leases only in memory vanish with the batch; ones already marked running go back
        self.store.release(w.id, [t for t in to_release if t[0] in self.marked])
        self.inflight.difference_update(t for t, _ in to_release)
        if self.cache is not None:  # tasks held behind the released ones in the cache
            self.inflight.difference_update(self.cache.dropped(t for t, _ in to_release))
        self.counts_stale = True
        self.cursor = None
        self.dry_until = 0.0

    def _replace(self, w: _Slot) -> None:
        self.deaths.append(time.monotonic())
        if len(self.deaths) >= 8 and self.deaths[-1] - self.deaths[-8] < 5.0 and self.attempts == 0:
            words = self.transport.last_words(w.link)
            raise RuntimeError(
                "workers keep dying at start; "
                + (f"the last one's stderr ends with:\n{words}" if words
                   else "see the worker logs in RUN/logs")
            )
        self.transport.forget(w.link)
        if self.interrupted:
            return
        self.workers[w.index] = self._start(w.index)

    def _check_timeouts(self) -> None:
        now = time.time()
        for w in list(self.workers):
            if not w.alive or not w.outstanding:
                continue
            task, started = self.transport.current(w.index)
            if not task:
                continue
            lease = next((x for _, ls, *_ in w.outstanding for x in ls if x.task == task), None)
            if lease is None:
                continue
            spec = self._spec(lease.spec)
            if spec.timeout is None:
                continue
            # command tasks time themselves out; this is only the backstop for a stuck worker
            limit = spec.timeout + (5.0 if spec.kind == "cmd" else 0.0)
            if now - started > limit:
                w.alive = False
                self.transport.kill([w.link])
                self._abandon(
                    w, Outcome.TIMED_OUT,
                    f"timed out after {spec.timeout:g} s; its worker process was killed and replaced",
                )
                self._replace(w)

    def _on_worker_exit(self, w: _Slot) -> None:
        if not w.alive:
            return
        w.alive = False
        status = self.transport.exit_status(w.link)
        if self.interrupted:  # the signal that stops the run reached the worker too
            self._abandon(w, None, "released: the run was stopped")
            return
        current, _ = self.transport.current(w.index)
        kind = None
        if current:
            lease = next((x for _, ls, *_ in w.outstanding for x in ls if x.task == current), None)
            kind = self._spec(lease.spec).kind if lease is not None else None
        outcome, note, code = describe_worker_death(status, kind)
        self._abandon(w, outcome, note, exit_code=code)
        self._replace(w)

    # --- main loop -------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.interrupted:  # a second Ctrl-C: no more patience
            signal.default_int_handler(signum, frame)
        self.interrupted = signal.Signals(signum).name

    def run(self) -> Summary:
        t0 = time.time()
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        self.transport.open(self.opts.n, self.run_dir)
        try:
            self._setup_gpus()
            self._serve_ready_from_cache()
            self.counts = self.store.counts()
            self.counts_stale = False
            self.halt_base = dict(self.counts)
            self._start_workers()
            self._loop()
        except BaseException:
            try:
                self._shutdown(kill=True)
            except Exception:  # e.g. the disk is still full: the next run reaps these leases
                pass
            raise
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
            self.transport.close()
            if self.cache is not None:
                self.cache.close()
        counts = self.store.counts()
        if self.on_progress is not None:
            self.counts, self.counts_stale = counts, False
            self._progress(final=True)
        summary = Summary(
            run=self.run_dir, total=sum(counts.values()), counts=counts, attempts=self.attempts,
            elapsed_s=time.time() - t0, interrupted=bool(self.interrupted), halted=self.halted,
        )
        if self.interrupted == "SIGINT":
            raise KeyboardInterrupt(str(summary))
        return summary

    def _setup_gpus(self) -> None:
        from ..execute.gpus import DevicePool, detect

        if self.opts.gpus_available is not None:
            vendor, devs = "nvidia", list(self.opts.gpus_available)
        else:
            vendor, devs = detect()
        if devs:
            self.gpu_pool = DevicePool(devs, vendor)

    def _loop(self) -> None:
        last_hb = last_running = time.monotonic()
        while True:
            if self._stop_asked() or (self.halted and self._halt_now()):
                self._shutdown(kill=True)
                return
            if self.feeding:
                self.feeding = bool(self.feed(0.0))
                self.dry_until = 0.0 if self.feeding else self.dry_until
            claimed_any = self._dispatch()
            busy = [w for w in self.workers if w.alive and w.outstanding]
            if not busy and not claimed_any:
                self._commit(force=True)
                if self.n_pending:
                    continue
                if self.feeding:
                    self.feeding = bool(self.feed(0.05))  # idle: block on the feed a little
                    self.dry_until = 0.0
                    continue
                # nothing in flight and nothing claimable: done, unless tasks wait in backoff
                nxt = self.store.next_ready_at()
                if nxt is None or self.halted:  # halted: tasks in backoff wait for the next run
                    if self._more_claimable():
                        continue
                    self._shutdown(kill=False)
                    return
                delay = min(max(nxt - time.time(), 0.0), 0.5)
                if self.stop_event is not None:
                    self.stop_event.wait(delay)
                else:
                    time.sleep(delay)
                self.dry_until = 0.0
                continue
            ready = self.transport.ready([w.link for w in busy], RECEIVE_WAIT_S)
            for link in ready:
                w = next(x for x in busy if x.link is link)
                if not w.alive:
                    continue  # found dead while handling an earlier message
                msg = self.transport.receive(link)
                if msg is None:
                    self._on_worker_exit(w)
                    continue
                self._on_message(w, from_worker_decoder.decode(msg))
            self._commit()
            self._check_timeouts()
            now = time.monotonic()
            if now - last_running > 0.5:
                self._mark_running()
                last_running = now
            if now - last_hb > self.opts.heartbeat_s:
                for w in self.workers:
                    if w.alive:
                        self.store.heartbeat(w.id)
                last_hb = now
            if not ready:
                self._progress()

    def _mark_running(self) -> None:
        """Record which leased tasks have started (one per busy worker, from the slots)."""
        for w in self.workers:
            if not (w.alive and w.outstanding):
                continue
            task, _ = self.transport.current(w.index)
            if task and task not in self.marked:
                lease = next((x for _, ls, *_ in w.outstanding for x in ls if x.task == task), None)
                if lease is not None:
                    self.store.start_leased(w.id, [lease])
                    self.marked.add(task)
                    if self.counts and not self.counts_stale:  # as the store now counts it
                        self.counts["ready"] = max(0, self.counts.get("ready", 0) - 1)
                        self.counts["running"] = self.counts.get("running", 0) + 1
        if len(self.marked) > 100_000:
            self.marked.intersection_update(self.inflight)

    def _more_claimable(self) -> bool:
        self.dry_until = 0.0
        self.cursor = None
        return self._dispatch()

    def _shutdown(self, kill: bool) -> None:
        if kill:
            alive = [w for w in self.workers if w.alive]
            for w in alive:
                w.alive = False
            self.transport.kill([w.link for w in alive])  # all at once: they die in parallel
            with self.store.transaction():  # one commit, not one (and its fsync) per worker
                for w in self.workers:
                    if w.outstanding:
                        self._abandon(w, None, "released: the run was stopped")
        else:
            alive = [w for w in self.workers if w.alive]
            for w in alive:
                w.alive = False
            self.transport.stop([w.link for w in alive])
        for w in self.workers:
            self.transport.forget(w.link)
        try:
            self._commit(force=True)
        except Exception:
            if not kill:
                raise

"""The local backend: one coordinator process and N worker processes on this host.

The coordinator is the only writer of the store. It leases small batches to each worker, sized
from observed task durations (about ``batch_target_s`` of work each, two batches in flight per
worker so no worker waits), commits results in batches, enforces timeouts by killing the worker
whose task overran (and starting a new one), and turns a dead worker's task into a ``lost``
attempt. Workers die with the coordinator (parent-death signal), so a killed coordinator leaves
no orphans, and the next run reaps its leases at once.
"""

from __future__ import annotations

import collections
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import msgspec

from ..states import Outcome
from ..task import PY, Finished, Lease, Resources, Spec
from ..worker import Batch, Done, Slots, local_worker_main, signal_label, slots_path

ProgressFn = Callable[[dict[str, int]], None]


class Summary(msgspec.Struct):
    """What one ``execute`` call did."""

    run: str | None
    total: int
    counts: dict[str, int]
    attempts: int  # attempts that ended during this call
    elapsed_s: float
    interrupted: bool = False

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
        head = "interrupted" if self.interrupted else "done"
        return (
            f"{head}: {self.total:,} tasks ({', '.join(parts)}); {self.attempts:,} attempts in"
            f" {self.elapsed_s:.2f} s ({self.throughput:,.0f}/s)"
            + (f"; run: {self.run}" if self.run else "")
        )


@dataclass
class _Worker:
    index: int
    id: str
    pid: int
    conn_out: Connection
    conn_in: Connection
    proc: Any = None  # a Popen when started fresh rather than forked
    outstanding: collections.deque = field(default_factory=collections.deque)
    specs_sent: set[int] = field(default_factory=set)
    cpus_held: int = 0
    gpus_held: list[str] = field(default_factory=list)
    alive: bool = True
    started: float = field(default_factory=time.time)


#: How long to wait for a worker whose pipe closed to be reapable (its exit status tells a
#: crash from a kill). The pipe closes in the kernel's exit path just before the process turns
#: into a zombie: microseconds, but a loaded host can delay it by a scheduler tick or two.
WORKER_EXIT_WAIT_S = 1.0

#: Signals a process raises against itself when its code goes wrong: a worker that dies of one
#: while running a Python task was crashed by that task (a C extension's segfault, abort()).
CRASH_SIGNALS = frozenset(
    int(s) for s in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE,
                     signal.SIGILL, signal.SIGSYS, signal.SIGTRAP)
)


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


_SIGNAL_WORDS = {
    int(signal.SIGSEGV): "segmentation fault", int(signal.SIGABRT): "aborted",
    int(signal.SIGBUS): "bus error", int(signal.SIGFPE): "floating-point exception",
    int(signal.SIGILL): "illegal instruction",
}


def _host() -> str:
    return socket.gethostname().split(".")[0]


def _close_fds_except(keep: set[int]) -> None:
    try:
        fds = [int(f) for f in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 256))
    for fd in fds:
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


class LocalBackend:
    """Run tasks with ``workers`` processes on this host (default: the CPU count)."""

    name = "local"

    def __init__(
        self,
        workers: int | None = None,
        *,
        batch_target_s: float = 0.02,
        max_batch: int = 4096,
        heartbeat_s: float = 10.0,
        commit_every_s: float = 0.05,
        capture_output: bool = True,
        gpus_available: list[str] | None = None,
    ) -> None:
        self.n = max(1, int(workers or os.cpu_count() or 1))
        self.batch_target_s = batch_target_s
        self.max_batch = max_batch
        self.heartbeat_s = heartbeat_s
        self.commit_every_s = commit_every_s
        self.capture_output = capture_output
        self.gpus_available = gpus_available

    # ------------------------------------------------------------------------------------------------
    def execute(
        self,
        store: Any,
        *,
        run_dir: str | None = None,
        on_progress: ProgressFn | None = None,
        feed: Callable[[float], bool] | None = None,
        on_finished: Callable[[list[tuple], list[Finished]], None] | None = None,
        on_dispatch: Callable[[list[Lease]], None] | None = None,
        stop: threading.Event | None = None,
    ) -> Summary:
        """Run every claimable task of ``store`` until none is left.

        ``feed(wait_s)`` (the Executor's) is called every loop turn to add tasks, waiting up to
        ``wait_s`` for one when idle; it returns False once no more will come. ``on_finished(ok_rows, others)`` sees every committed outcome: plain
        successes as :data:`~pipefarm.task.SuccessRow` rows, the rest as Finished. ``on_dispatch(leases)`` sees leases as they are sent to a worker. ``stop`` ends the run
        like Ctrl-C does.
        """
        return _Coordinator(self, store, run_dir, on_progress, feed, on_finished, stop,
                            on_dispatch).run()


class _Coordinator:
    def __init__(self, cfg: LocalBackend, store: Any, run_dir: str | None,
                 on_progress: ProgressFn | None, feed: Callable[[float], bool] | None,
                 on_finished: Callable[[list[tuple], list[Finished]], None] | None,
                 stop: threading.Event | None,
                 on_dispatch: Callable[[list[Lease]], None] | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.run_dir = run_dir
        self.on_progress = on_progress
        self.feed = feed
        self.on_finished = on_finished
        self.on_dispatch = on_dispatch
        self.stop_event = stop
        self.tag = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.host = _host()
        self.workers: list[_Worker] = []
        # committed-but-not-yet outcomes per worker: plain success rows, and everything else
        self.pending_ok: dict[str, list[tuple]] = collections.defaultdict(list)
        self.pending_other: dict[str, list[Finished]] = collections.defaultdict(list)
        self.n_pending = 0
        # leases live in memory (see SQLiteStore.lease_ready): ids leased and not yet committed
        self.inflight: set[int] = set()
        self.cursor: tuple[int, float, int] | None = None
        self.last_commit = time.monotonic()
        self.batch_id = 0
        self.per_task_s: float | None = None  # EWMA of task duration
        self.specs: dict[int, Spec] = {}
        self.spec_blobs: dict[int, bytes] = {}
        self.dry_until = 0.0
        self.attempts = 0
        self.interrupted: str | None = None
        self.deaths: collections.deque = collections.deque(maxlen=64)
        self.counts: dict[str, int] = {}
        self.counts_stale = True
        self.last_counts = 0.0
        self.feeding = feed is not None
        self.gpu_pool: Any = None
        self.resourceful = False
        self.cpus_free = cfg.n
        self.slots: Slots | None = None
        self.spawned = 0
        self.marked: set[int] = set()

    # --- workers ---------------------------------------------------------------------------------
    def _spawn(self, index: int) -> _Worker:
        c2w_r, c2w_w = os.pipe()
        w2c_r, w2c_w = os.pipe()
        self.spawned += 1
        wid = f"{self.host}-{self.tag}-w{index}.{self.spawned}"
        output = ""
        if self.cfg.capture_output and self.run_dir:
            logs = os.path.join(self.run_dir, "logs")
            os.makedirs(logs, mode=0o700, exist_ok=True)
            output = os.path.join(logs, f"python-{self.host}-{os.getpid()}-w{index}.log")
        assert self.slots is not None
        args = (c2w_r, w2c_w, self.slots.path, self.cfg.n, index, self.run_dir or "", wid, output)
        proc = None
        # fork is fast (no interpreter start, modules already imported) and safe while this
        # process has a single thread; otherwise start a fresh interpreter.
        if sys.platform.startswith("linux") and threading.active_count() == 1:
            pid = os.fork()
            if pid == 0:  # the child
                code = 0
                try:
                    os.setsid()
                    _close_fds_except({c2w_r, w2c_w})
                    local_worker_main(*args[:5], args[5] or None, wid, output or None)
                except BaseException:
                    code = 1
                finally:
                    os._exit(code)
        else:
            import subprocess

            proc = subprocess.Popen(
                [sys.executable, "-m", "pipefarm.worker", "--local", *map(str, args)],
                pass_fds=(c2w_r, w2c_w), stdin=subprocess.DEVNULL, start_new_session=True,
            )
            pid = proc.pid
        os.close(c2w_r)
        os.close(w2c_w)
        w = _Worker(index, wid, pid, Connection(c2w_w, readable=False),
                    Connection(w2c_r, writable=False), proc)
        self.store.register_worker(wid, self.host, pid)
        return w

    def _kill(self, w: _Worker) -> None:
        w.alive = False
        for sig_target in (lambda: os.killpg(w.pid, signal.SIGKILL), lambda: os.kill(w.pid, signal.SIGKILL)):
            try:
                sig_target()
                break
            except (ProcessLookupError, PermissionError):
                continue
        self._reap_child(w, block=True)

    def _reap_child(self, w: _Worker, block: bool = False, wait_s: float = 0.0) -> int | None:
        """Reap ``w`` (waiting up to ``wait_s`` for it to end, or 5 s with ``block``) and
        close its pipes; its exit status as ``Popen.returncode`` has it (-N: signal N), or
        None when it has not ended or was reaped elsewhere."""
        status: int | None = None
        try:
            if w.proc is not None:
                status = w.proc.wait(timeout=5 if block else wait_s)
            else:
                end = time.monotonic() + (5.0 if block else wait_s)
                while True:
                    pid, raw = os.waitpid(w.pid, os.WNOHANG)
                    if pid:
                        status = os.waitstatus_to_exitcode(raw)
                        break
                    if time.monotonic() >= end:
                        break
                    time.sleep(0.002)
        except Exception:
            pass
        for c in (w.conn_out, w.conn_in):
            try:
                c.close()
            except OSError:
                pass
        return status

    # --- batches ---------------------------------------------------------------------------------
    def _batch_size(self) -> int:
        if self.per_task_s is None:
            return 1  # nothing measured yet: one task, then sized from what it took
        n = int(self.cfg.batch_target_s / max(self.per_task_s, 1e-7))
        return max(1, min(self.cfg.max_batch, n))

    def _spec(self, sid: int) -> Spec:
        spec = self.specs.get(sid)
        if spec is None:
            spec = self.specs[sid] = self.store.spec(sid)
            self.spec_blobs[sid] = msgspec.msgpack.encode(spec)
            r = spec.resources
            if r.cpus > 1 or r.gpus > 0:
                self.resourceful = True
        return spec

    def _depth(self) -> int:
        """Batches in flight per worker: a second one hides the round trip for short tasks;
        for long (or not yet measured) tasks it would only hold work back from idle workers."""
        if self.resourceful or self.per_task_s is None or self.per_task_s > 0.5:
            return 1
        return 2

    def _fill(self, w: _Worker, depth: int) -> bool:
        """Send ``w`` work until it has ``depth`` batches; False when it has none and nothing
        was claimable."""
        now = time.monotonic()
        if now < self.dry_until or self.interrupted or not w.alive:
            return False
        while len(w.outstanding) < depth:
            env = None
            held_cpus, held_gpus = 1, []
            if self.resourceful:
                if w.outstanding or self.cpus_free < 1:
                    return True
                gpus_free = self.gpu_pool.free_count() if self.gpu_pool else 0
                leases, _ = self.store.lease_ready(
                    1, self.inflight, None, Resources(cpus=self.cpus_free, gpus=gpus_free))
                if leases:
                    spec = self._spec(leases[0].spec)
                    held_cpus = max(1, spec.resources.cpus)
                    env, held_gpus = self._devices_for(spec)
            else:
                leases, self.cursor = self.store.lease_ready(self._batch_size(), self.inflight, self.cursor)
            if not leases:
                self.dry_until = now + 0.1
                return bool(w.outstanding)  # whatever was sent before still counts
            specs = {}
            for lease in leases:
                if lease.spec not in w.specs_sent:
                    self._spec(lease.spec)
                    specs[lease.spec] = self.spec_blobs[lease.spec]
                    w.specs_sent.add(lease.spec)
            if self.resourceful and not env:
                env, held_gpus = self._devices_for(self._spec(leases[0].spec))
            self.inflight.update(lz.task for lz in leases)
            self.batch_id += 1
            w.conn_out.send_bytes(msgspec.msgpack.encode(Batch(self.batch_id, leases, specs, env)))
            w.outstanding.append((self.batch_id, leases, time.monotonic(), held_cpus, held_gpus))
            if self.on_dispatch is not None:
                self.on_dispatch(leases)
            if self.resourceful:
                self.cpus_free -= held_cpus
        return True

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
    def _on_done(self, w: _Worker, done: Done) -> None:
        if not w.outstanding or w.outstanding[0][0] != done.id:
            return  # a batch we already gave up on
        if done.final:
            _, leases, sent, cpus, gpus = w.outstanding.popleft()
            self._release_resources(cpus, gpus)
        if done.ok:
            self.pending_ok[w.id].extend(done.ok)
        if done.others:
            self.pending_other[w.id].extend(done.others)
        n = len(done.ok) + len(done.others)
        self.n_pending += n
        if n:
            busy = max(done.busy / n, 2e-6)
            self.per_task_s = busy if self.per_task_s is None else 0.7 * self.per_task_s + 0.3 * busy

    def _commit(self, force: bool = False) -> None:
        if not self.n_pending:
            return
        now = time.monotonic()
        if not force and self.n_pending < 20000 and now - self.last_commit < self.cfg.commit_every_s:
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
        self.inflight.difference_update(r[0] for r in all_ok)
        self.inflight.difference_update(f.task for f in all_other)
        self.n_pending = 0
        self.last_commit = now
        self.dry_until = 0.0
        self.attempts += len(all_ok) + len(all_other)
        has_deps = getattr(self.store, "_has_deps", False)
        if all_other or has_deps:
            self.cursor = None  # a retry or an unblocked dependent may be ready before the cursor
            self.counts_stale = True
        elif self.counts:
            self.counts["succeeded"] += len(all_ok)
            self.counts["ready"] = max(0, self.counts["ready"] - len(all_ok))
        if self.on_finished is not None:
            self.on_finished(all_ok, all_other)
        self._progress()

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
    def _abandon(self, w: _Worker, current_outcome: Outcome | None, note: str,
                 exit_code: int | None = None) -> None:
        """``w`` is gone: its current task gets ``current_outcome``, the rest are released."""
        assert self.slots is not None
        current, started = self.slots.get(w.index)
        self.slots.clear(w.index)
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
        self.counts_stale = True
        self.cursor = None
        self.dry_until = 0.0

    def _replace(self, w: _Worker) -> None:
        self.deaths.append(time.monotonic())
        if len(self.deaths) >= 8 and self.deaths[-1] - self.deaths[-8] < 5.0 and self.attempts == 0:
            raise RuntimeError("workers keep dying at start; see the worker logs in RUN/logs")
        if self.interrupted:
            return
        self.workers[w.index] = self._spawn(w.index)

    def _check_timeouts(self) -> None:
        now = time.time()
        for w in list(self.workers):
            if not w.alive or not w.outstanding:
                continue
            task, started = self.slots.get(w.index)
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
                self._kill(w)
                self._abandon(
                    w, Outcome.TIMED_OUT,
                    f"timed out after {spec.timeout:g} s; its worker process was killed and replaced",
                )
                self._replace(w)

    def _on_worker_exit(self, w: _Worker) -> None:
        if not w.alive:
            return
        w.alive = False
        # its pipe closes a moment before it can be reaped: wait briefly for the exit status
        status = self._reap_child(w, wait_s=WORKER_EXIT_WAIT_S)
        if self.interrupted:  # the signal that stops the run reached the worker too
            self._abandon(w, None, "released: the run was stopped")
            return
        assert self.slots is not None
        current, _ = self.slots.get(w.index)
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
        self.slots = Slots(slots_path(self.tag), self.cfg.n, create=True)
        try:
            self._setup_gpus()
            with self.store.transaction():  # one commit for every worker's registration
                self.workers = [self._spawn(i) for i in range(self.cfg.n)]
            self.counts = self.store.counts()
            self.counts_stale = False
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
            self.slots.close()
            try:
                os.unlink(self.slots.path)
            except OSError:
                pass
        counts = self.store.counts()
        if self.on_progress is not None:
            self.counts, self.counts_stale = counts, False
            self._progress(final=True)
        summary = Summary(
            run=self.run_dir, total=sum(counts.values()), counts=counts, attempts=self.attempts,
            elapsed_s=time.time() - t0, interrupted=bool(self.interrupted),
        )
        if self.interrupted == "SIGINT":
            raise KeyboardInterrupt(str(summary))
        return summary

    def _setup_gpus(self) -> None:
        from ..execute.gpus import DevicePool, detect

        if self.cfg.gpus_available is not None:
            vendor, devs = "nvidia", list(self.cfg.gpus_available)
        else:
            vendor, devs = detect()
        if devs:
            self.gpu_pool = DevicePool(devs, vendor)

    def _loop(self) -> None:
        last_hb = last_running = time.monotonic()
        while True:
            if self.stop_event is not None and self.stop_event.is_set() and not self.interrupted:
                self.interrupted = "stop"
            if self.interrupted:
                self._shutdown(kill=True)
                return
            if self.feeding:
                self.feeding = bool(self.feed(0.0))
                self.dry_until = 0.0 if self.feeding else self.dry_until
            claimed_any = False
            for depth in range(1, self._depth() + 1):  # every worker one batch before any two
                for w in self.workers:
                    claimed_any |= self._fill(w, depth)
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
                nxt = self.store.next_ready_at() if hasattr(self.store, "next_ready_at") else None
                if nxt is None and not self._more_claimable():
                    self._shutdown(kill=False)
                    return
                delay = 0.05 if nxt is None else min(max(nxt - time.time(), 0.0), 0.5)
                if self.stop_event is not None:
                    self.stop_event.wait(delay)
                else:
                    time.sleep(delay)
                self.dry_until = 0.0
                continue
            conns = [w.conn_in for w in busy]
            try:
                ready = wait(conns, timeout=0.02)
            except InterruptedError:
                ready = []
            for c in ready:
                w = next(x for x in busy if x.conn_in is c)
                try:
                    msg = c.recv_bytes()
                except (EOFError, OSError):
                    self._on_worker_exit(w)
                    continue
                self._on_done(w, msgspec.msgpack.decode(msg, type=Done))
            self._commit()
            self._check_timeouts()
            now = time.monotonic()
            if now - last_running > 0.5:
                self._mark_running()
                last_running = now
            if now - last_hb > self.cfg.heartbeat_s:
                for w in self.workers:
                    if w.alive:
                        self.store.heartbeat(w.id)
                last_hb = now
            if not ready:
                self._progress()

    def _mark_running(self) -> None:
        """Record which leased tasks have started (one per busy worker, from the slots)."""
        assert self.slots is not None
        for w in self.workers:
            if not (w.alive and w.outstanding):
                continue
            task, _ = self.slots.get(w.index)
            if task and task not in self.marked:
                lease = next((x for _, ls, *_ in w.outstanding for x in ls if x.task == task), None)
                if lease is not None:
                    self.store.start_leased(w.id, [lease])
                    self.marked.add(task)
        if len(self.marked) > 100_000:
            self.marked.intersection_update(self.inflight)

    def _more_claimable(self) -> bool:
        self.dry_until = 0.0
        self.cursor = None
        probe = [w for w in self.workers if w.alive]
        return any(self._fill(w, 1) for w in probe[:1])

    def _shutdown(self, kill: bool) -> None:
        if kill:
            for w in self.workers:
                if w.alive:
                    self._kill(w)
            for w in self.workers:
                if w.outstanding:
                    self._abandon(w, None, "released: the run was stopped")
        else:
            for w in self.workers:
                if w.alive:
                    try:
                        w.conn_out.send_bytes(msgspec.msgpack.encode(None))
                    except OSError:
                        pass
            for w in self.workers:
                if w.alive:
                    w.alive = False
                    self._reap_child(w, block=True)
        try:
            self._commit(force=True)
        except Exception:
            if not kill:
                raise

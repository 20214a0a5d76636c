"""The local backend: one coordinator process and N worker processes on this host.

The coordinator is the only writer of the store. It starts at most one worker per task that
could run (lazily, as tasks arrive, when fed by the Executor), leases batches of about
``batch_target_s`` of work sized from the durations measured for each spec (function or
command), splits what it leases evenly over the workers that want work, queues a second batch
behind short ones only when no worker is idle, and lets an idle worker take over the unstarted
tail of a busy one (:class:`~pipefarm.worker.Revoke`). It commits results in batches, enforces
timeouts by killing the worker whose task overran (and starting a new one), and turns a dead
worker's task into a ``lost`` attempt; a worker found dead when work is sent to it is the same
loss, never a crash of the run. Workers die with the coordinator (parent-death signal), so a
killed coordinator leaves no orphans, and the next run reaps its leases at once.
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
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import msgspec

from ..states import TERMINAL, Outcome
from ..task import PY, Finished, Lease, Resources, Spec, signal_label
from ..worker import (
    Batch,
    Done,
    Revoke,
    Revoked,
    Slots,
    from_worker_decoder,
    local_worker_main,
    slots_path,
)
from .base import Summary

ProgressFn = Callable[[dict[str, int]], None]


#: ``fail=N%`` is judged only once at least this many tasks have ended in the run being
#: halted (GNU parallel judges from the first job): with fewer, one early failure among the
#: first three would already be 33% and halt a sweep whose failure rate is 1%.
HALT_PERCENT_MIN_ENDED = 10


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
    # batch id -> [leases neither reported nor handed back, spec id or -1 when mixed]
    batches: dict[int, list[int]] = field(default_factory=dict)
    revoking: bool = False  # a Revoke is on its way: no second one, no more work until answered
    heard: float = field(default_factory=time.monotonic)  # last message from it or batch to it
    err: Any = None  # forked: the read end of the pipe its last words (a traceback) come through
    err_tail: bytearray = field(default_factory=bytearray)  # fresh: the end of its stderr
    err_thread: Any = None  # fresh: the thread that copies its stderr


#: ``workers`` above this many per CPU gets a warning (it is not a limit: tasks that mostly
#: wait, on I/O or sleeps, can use more workers than CPUs). Measured on the 2-CPU development
#: host: 10,000 workers asked for 2 tasks used to fork 10,000 processes (load average above 300,
#: minutes to stop); 1,000 forked workers take about 1 s to start and 20 s to stop. Below 8 per
#: CPU, starting them costs well under a second and nothing to stop.
MANY_WORKERS_PER_CPU = 8

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

#: How much of a dying worker's stderr (or traceback) is kept to name the cause.
LAST_WORDS_BYTES = 4096

_TERMINAL_LABELS = frozenset(s.label for s in TERMINAL)

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


def _write_last_words(fd: int) -> None:
    """In a forked worker about to exit with an exception: its traceback to ``fd`` (read by
    the coordinator) and to stderr."""
    try:
        import traceback

        text = traceback.format_exc().encode(errors="replace")[-LAST_WORDS_BYTES:]
        os.write(fd, text)
        os.write(2, text)
    except BaseException:  # noqa: S110 - exiting anyway; nothing left to tell
        pass


def _worker_env() -> dict[str, str]:
    """This environment with this process's import path first on ``PYTHONPATH``: a fresh
    interpreter then finds pipefarm and the tasks' modules where this one found them (also when
    they were only put on ``sys.path``)."""
    env = dict(os.environ)
    paths = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
    if env.get("PYTHONPATH"):
        paths += env["PYTHONPATH"].split(os.pathsep)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    return env


def _copy_stderr(stream: Any, tail: bytearray, log: str | None) -> None:
    """Copy a fresh worker's stderr to ours (or to its log file) and keep the end of it."""
    fd = stream.fileno()
    out = None
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            tail.extend(chunk)
            del tail[:-LAST_WORDS_BYTES]
            try:
                if log:
                    if out is None:
                        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                    os.write(out, chunk)
                else:
                    os.write(2, chunk)
            except OSError:
                pass
    except OSError:
        return
    finally:
        if out is not None:
            os.close(out)
        stream.close()


def _send_or_eof(conn: Connection, data: bytes) -> bool:
    """Send ``data``; False when the other end is gone (EPIPE: the worker died)."""
    try:
        conn.send_bytes(data)
    except OSError:
        return False
    return True


def _sigkill(pid: int) -> None:
    """SIGKILL a worker's process group (its task's children too), or the worker alone."""
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            kill()
            return
        except (ProcessLookupError, PermissionError):
            continue


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
        halt: str | HaltPolicy | None = None,
    ) -> None:
        self.n = max(1, int(workers or os.cpu_count() or 1))
        self.halt = None if halt is None else HaltPolicy.parse(halt)
        self.batch_target_s = batch_target_s
        self.max_batch = max_batch
        self.heartbeat_s = heartbeat_s
        self.commit_every_s = commit_every_s
        self.capture_output = capture_output
        self.gpus_available = gpus_available
        cpus = os.cpu_count() or 1
        if self.n > MANY_WORKERS_PER_CPU * cpus:
            warnings.warn(
                f"{self.n:,} workers asked for on a host with {cpus} CPU(s): at most one is"
                " started per task that can run, but beyond a few per CPU they mostly compete"
                " for the CPUs", RuntimeWarning, stacklevel=2,
            )

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
        # measured seconds per task, per spec (an EWMA): batches are sized from these, so the
        # history of one function never sizes the batches of another
        self.spec_s: dict[int, float] = {}
        self.last_spec: int | None = None  # the spec of the latest task leased
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
        # fed tasks arrive one by one: workers start as they are needed, up to cfg.n
        self.lazy = feed is not None
        self.gpu_pool: Any = None
        self.resourceful = False
        self.cpus_free = cfg.n
        self.slots: Slots | None = None
        self.spawned = 0
        self.marked: set[int] = set()
        # the halt policy: failures and ended tasks counted from this call's start
        self.halted: str | None = None
        self.halt_base: dict[str, int] = {}
        self.halt_failed = 0
        self.halt_ended = 0

    # --- workers ---------------------------------------------------------------------------------
    def _spawn(self, index: int) -> _Worker:
        c2w_r, c2w_w = os.pipe()
        w2c_r, w2c_w = os.pipe()
        self.spawned += 1
        wid = f"{self.host}-{self.tag}-w{index}.{self.spawned}"
        output = err_log = ""
        if self.cfg.capture_output and self.run_dir:
            # the worker appends its stdout/stderr to logs/<wid>.out/.err (Python tasks'
            # output is attributed per attempt from there); a fresh worker's early stderr
            # goes to the .err file too
            output = os.path.join(self.run_dir, "logs")
            os.makedirs(output, mode=0o700, exist_ok=True)
            err_log = os.path.join(output, wid + ".err")
        assert self.slots is not None
        args = (c2w_r, w2c_w, self.slots.path, self.cfg.n, index, self.run_dir or "", wid, output)
        proc = err = drain = None
        tail = bytearray()
        try:
            # fork is fast (no interpreter start, modules already imported) and safe while this
            # process has a single thread; otherwise start a fresh interpreter.
            if sys.platform.startswith("linux") and threading.active_count() == 1:
                err_r, err_w = os.pipe()  # the child's last words, should it fail
                try:
                    pid = os.fork()
                except OSError:
                    os.close(err_r)
                    os.close(err_w)
                    raise
                if pid == 0:  # the child
                    code = 0
                    try:
                        os.setsid()
                        _close_fds_except({c2w_r, w2c_w, err_w})
                        local_worker_main(*args[:5], args[5] or None, wid, output or None)
                    except BaseException:
                        code = 1
                        _write_last_words(err_w)
                    finally:
                        os._exit(code)
                os.close(err_w)
                os.set_blocking(err_r, False)
                err = os.fdopen(err_r, "rb", buffering=0)
            else:
                import subprocess

                # its stderr comes through a pipe, so that if it cannot start (no pipefarm
                # there, a broken environment) the error can name the cause
                proc = subprocess.Popen(
                    [sys.executable, "-m", "pipefarm.worker", "--local", *map(str, args)],
                    pass_fds=(c2w_r, w2c_w), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                    env=_worker_env(), start_new_session=True,
                )
                pid = proc.pid
                drain = threading.Thread(target=_copy_stderr, args=(proc.stderr, tail, err_log),
                                         name="pipefarm-worker-stderr", daemon=True)
                drain.start()
        except BaseException:
            for fd in (c2w_r, c2w_w, w2c_r, w2c_w):
                os.close(fd)
            raise
        os.close(c2w_r)
        os.close(w2c_w)
        w = _Worker(index, wid, pid, Connection(c2w_w, readable=False),
                    Connection(w2c_r, writable=False), proc, err=err, err_tail=tail,
                    err_thread=drain)
        self.store.register_worker(wid, self.host, pid)
        return w

    def _start_workers(self) -> None:
        """Start one worker per task that could run, at most ``cfg.n`` (when fed, none: they
        start as tasks arrive). A stop signal ends the starting at once."""
        if self.lazy:
            return
        runnable = sum(v for k, v in self.counts.items() if k not in _TERMINAL_LABELS)
        want = min(self.cfg.n, runnable)
        with self.store.transaction():  # one commit for every worker's registration
            for i in range(want):
                if self._stop_asked():
                    break
                try:
                    self.workers.append(self._spawn(i))
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

    def _kill(self, w: _Worker) -> None:
        w.alive = False
        _sigkill(w.pid)
        self._reap_child(w, block=True)

    def _last_words(self, w: _Worker) -> str:
        """The end of what dead worker ``w`` wrote to stderr (fresh) or its traceback (forked)."""
        data = b""
        if w.err is not None:
            try:
                data = w.err.read() or b""
            except OSError:
                pass
        elif w.err_thread is not None:
            w.err_thread.join(timeout=2.0)  # it is dead: the rest of its stderr is on its way
            data = bytes(w.err_tail)
        self._forget(w)
        lines = data.decode(errors="replace").strip().splitlines()
        return "\n".join(lines[-20:])

    def _forget(self, w: _Worker) -> None:
        """Close what is left of dead worker ``w`` besides its pipes (see _reap_child)."""
        if w.err is not None:
            try:
                w.err.close()
            except OSError:
                pass
            w.err = None

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
    def _per_batch(self, sid: int | None) -> int:
        """How many tasks of spec ``sid`` make about ``batch_target_s`` of work (1 until one of
        them was measured: one task, then sized from what it took)."""
        est = self.spec_s.get(sid) if sid is not None else None
        if est is None:
            return 1
        return max(1, min(self.cfg.max_batch, int(self.cfg.batch_target_s / max(est, 1e-7))))

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
            spare = self.cfg.n - len(self.workers) if self.lazy else 0
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

    def _hand_out(self, targets: list[_Worker], spare: int) -> bool:
        """Lease work for ``targets`` and ``spare`` workers not started yet, split evenly over
        them (starting workers for the shares beyond ``targets``); False when nothing was
        ready (True even when a worker turned out dead: its share is ready again)."""
        k = len(targets) + spare
        leases, cursor = self.store.lease_ready(self._per_batch(self.last_spec) * k, self.inflight,
                                                self.cursor)
        if not leases:
            self.dry_until = time.monotonic() + 0.1
            return False
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
                    w = self._spawn(len(self.workers))
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
        target = self.cfg.batch_target_s
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

    def _send(self, w: _Worker, leases: list[Lease], sid: int, env: dict[str, str] | None = None,
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
        if not _send_or_eof(w.conn_out, msgspec.msgpack.encode(Batch(bid, leases, specs, env))):
            self._on_worker_exit(w)  # it died since we last heard of it: a lost worker
            return False
        if self.on_dispatch is not None:
            self.on_dispatch(leases)
        return True

    def _fill_resourceful(self, w: _Worker) -> bool:
        """Tasks that need several CPUs or GPUs go one at a time, as the resources allow."""
        now = time.monotonic()
        if now < self.dry_until or not w.alive or w.outstanding or self.cpus_free < 1:
            return False
        gpus_free = self.gpu_pool.free_count() if self.gpu_pool else 0
        leases, _ = self.store.lease_ready(
            1, self.inflight, None, Resources(cpus=self.cpus_free, gpus=gpus_free))
        if not leases:
            self.dry_until = now + 0.1
            return False
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
            if not _send_or_eof(w.conn_out, msgspec.msgpack.encode(Revoke(thieves))):
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
    def _on_message(self, w: _Worker, msg: Done | Revoked) -> None:
        w.heard = time.monotonic()
        if isinstance(msg, Revoked):
            self._on_revoked(w, msg.tasks)
        else:
            self._on_done(w, msg)

    def _on_done(self, w: _Worker, done: Done) -> None:
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

    def _learn_mixed(self, w: _Worker, done: Done) -> None:
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

    def _batch_done(self, w: _Worker, bid: int) -> None:
        """Every lease of batch ``bid`` was reported or handed back."""
        del w.batches[bid]
        for i, entry in enumerate(w.outstanding):
            if entry[0] == bid:
                del w.outstanding[i]
                self._release_resources(entry[3], entry[4])
                return

    def _on_revoked(self, w: _Worker, tasks: list[int]) -> None:
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
        self.cursor = None
        self.dry_until = 0.0

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
        if self.cfg.halt is not None and not self.halted:
            self._check_halt(len(all_ok), bool(all_other))
        self._progress()

    def _halt_now(self) -> bool:
        return self.cfg.halt is not None and self.cfg.halt.when == "now"

    def _check_halt(self, n_ok: int, others: bool) -> None:
        """Apply the halt policy after a commit. Only a commit with unsuccessful outcomes
        pays for a count of the catalog (whether a failure was the task's last try is the
        store's to say); plain successes just add to the tasks that ended."""
        halt = self.cfg.halt
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
                    if _send_or_eof(w.conn_out, msgspec.msgpack.encode(Revoke(HALT_TAKE_ALL))):
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
            words = self._last_words(w)
            raise RuntimeError(
                "workers keep dying at start; "
                + (f"the last one's stderr ends with:\n{words}" if words
                   else "see the worker logs in RUN/logs")
            )
        self._forget(w)
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
            elapsed_s=time.time() - t0, interrupted=bool(self.interrupted), halted=self.halted,
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
                nxt = self.store.next_ready_at() if hasattr(self.store, "next_ready_at") else None
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
            conns = [w.conn_in for w in busy]
            try:
                ready = wait(conns, timeout=0.02)
            except InterruptedError:
                ready = []
            for c in ready:
                w = next(x for x in busy if x.conn_in is c)
                if not w.alive:
                    continue  # found dead while handling an earlier message
                try:
                    msg = c.recv_bytes()
                except (EOFError, OSError):
                    msg = None  # handled outside the except block: no exception context
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
        return self._dispatch()

    def _shutdown(self, kill: bool) -> None:
        if kill:
            alive = [w for w in self.workers if w.alive]
            for w in alive:  # all at once: they die in parallel, then each is reaped
                _sigkill(w.pid)
            for w in alive:
                self._kill(w)
            with self.store.transaction():  # one commit, not one (and its fsync) per worker
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
        for w in self.workers:
            self._forget(w)
        try:
            self._commit(force=True)
        except Exception:
            if not kill:
                raise

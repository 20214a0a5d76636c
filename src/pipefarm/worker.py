"""The worker: a process that executes leased tasks and reports how each attempt ended.

The local backend starts workers and feeds them batches over a pipe (:func:`serve_pipe`). A
worker marks the task it is running in a shared slot (:class:`Slots`), so its coordinator can
enforce timeouts and show what is running without a message per task.

It stays one module (about 600 lines) because its three parts -- :class:`LeaseRunner`, the pipe
loop and the signal handling -- share one process-wide state (``STOPPING``, the inherited
signals reset once at start) that a split would have to pass around; the array worker loop
(``backends/array``) imports :class:`LeaseRunner` from here.
"""

from __future__ import annotations

import collections
import ctypes
import mmap
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from .execute import checkpoint
from .states import Outcome
from .task import CMD, INLINE_RESULT_MAX, PY, Finished, Lease, Spec, signal_label

# --- the shared slots -----------------------------------------------------------------------------
_SLOT = struct.Struct("<qd")  # task id (0: idle), start time


class Slots:
    """One ``(task, started_at)`` cell per worker in a small shared memory file."""

    def __init__(self, path: str | os.PathLike[str], n: int, create: bool = False) -> None:
        self.path = str(path)
        size = max(_SLOT.size * n, mmap.PAGESIZE)
        if create:
            with open(self.path, "wb") as fh:
                fh.truncate(size)
        self._fh = open(self.path, "r+b")  # noqa: SIM115 - lives as long as the mapping
        self._mm = mmap.mmap(self._fh.fileno(), size)

    def set(self, i: int, task: int, started: float) -> None:
        # start time first, task id last: a reader that sees the id also sees its start
        struct.pack_into("<d", self._mm, i * _SLOT.size + 8, started)
        struct.pack_into("<q", self._mm, i * _SLOT.size, task)

    def clear(self, i: int) -> None:
        struct.pack_into("<q", self._mm, i * _SLOT.size, 0)

    def get(self, i: int) -> tuple[int, float]:
        return _SLOT.unpack_from(self._mm, i * _SLOT.size)

    def close(self) -> None:
        try:
            self._mm.close()
            self._fh.close()
        except (ValueError, OSError):
            pass


def slots_path(tag: str) -> str:
    """Where a coordinator's slots file lives: memory-backed when the host has /dev/shm."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    if base is None:
        import tempfile

        base = tempfile.gettempdir()
    return os.path.join(base, f"pipefarm-{tag}.slots")


# --- parent death ---------------------------------------------------------------------------------
def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux).

    Elsewhere the pipe to the coordinator closing ends the worker between tasks.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return


# --- signals the tasks inherit --------------------------------------------------------------------
def _keep_running(signum: int, frame: Any) -> None:
    """A handler that does nothing: the worker survives the signal, and a process it execs
    starts with the default disposition (exec resets handled signals, not ignored ones)."""


def reset_inherited_signals() -> None:
    """Give this worker's task processes default signal dispositions and an empty mask.

    A worker started as a background job of a shell, or by a script that ignores the
    scheduler's warning signals, inherits "ignore" for SIGINT, SIGUSR1, ... and would pass it
    on to every command it runs, so a simulation that checkpoints on SIGUSR1 would never see
    it. Each inherited ignore becomes a do-nothing handler (the worker stays immune, its
    children are not), and signals blocked by whoever started us are unblocked.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGPIPE):
            continue  # SIGPIPE: Python ignores it on purpose; subprocess restores it for children
        try:
            if signal.getsignal(sig) == signal.SIG_IGN:
                signal.signal(sig, _keep_running)
        except (OSError, ValueError, RuntimeError):
            continue  # signals Python may not handle (e.g. real-time ones it reserves)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_SETMASK, set())


#: Signals that stop a worker from outside (scheduler cancel, preemption, walltime, Ctrl-C). A
#: command that dies of one of these while its worker is being stopped was killed with it.
STOP_SIGNALS = frozenset(
    int(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL,
                     signal.SIGUSR1, signal.SIGUSR2)
)
#: How long a worker waits for its own stop signal after a command died of a stop-like signal.
#: A scheduler signals every process of the job one after another (scancel, KillWait): the task
#: may die a few milliseconds before the worker hears of it. Measured here: under `scancel` of a
#: SLURM element the worker's handler ran within 30 ms of its task's death; 0.5 s is generous
#: and costs nothing unless a task really dies of such a signal.
STOP_GRACE_S = 0.5


def stop_signal_of(exit_code: int | None) -> int | None:
    """The stop-like signal a command died of (``-N``, or ``128+N`` as a shell reports it)."""
    if exit_code is None:
        return None
    sig = -exit_code if exit_code < 0 else exit_code - 128 if 128 < exit_code < 160 else 0
    return sig if sig in STOP_SIGNALS else None


#: Set when this worker process is told to stop from outside (see :func:`stop_on`).
STOPPING = threading.Event()


def stop_on(*signals: int) -> None:
    """Make ``signals`` set :data:`STOPPING` and nothing else (main thread only)."""

    def handler(signum: int, frame: Any) -> None:
        # Event.set takes a lock the interrupted main thread may hold (inside Event.wait)
        threading.Thread(target=STOPPING.set, daemon=True).start()

    for sig in signals:
        signal.signal(sig, handler)


# --- executing one lease --------------------------------------------------------------------------
class LeaseRunner:
    """Runs leases of any kind; caches callables and command templates per spec.

    ``stopping`` is set when the worker is being stopped from outside (a drain or stop signal):
    a command that then dies of a stop-like signal is recorded ``lost`` (it runs again and
    spends no retry), not as the task's failure.
    """

    def __init__(self, run_dir: str | None, worker_id: str, specs: dict[int, Spec], *,
                 stopping: threading.Event | None = None, capture_py: bool = False) -> None:
        self.run_dir = run_dir
        self.worker_id = worker_id
        self.specs = specs
        self.stopping = STOPPING if stopping is None else stopping
        self._fns: dict[int, Callable[..., Any]] = {}
        self._cmds: dict[int, Any] = {}
        self._sink: Any = None
        # capture_py: this process's fds 1 and 2 are appended to this worker's log files
        # (logs/<worker_id>.out/.err, the files its command output goes to), so a Python
        # task's output is the bytes the files grew by while it ran. _py_ends caches where
        # they ended after the last Python task (None: a command wrote since, ask the files).
        self.capture_py = capture_py
        self._py_ends: tuple[int, int] | None = None
        self._py_wrote = False  # fds 1/2 grew since the last sync
        # where the running attempt's output starts: (task, attempt, "s" shared files or "t"
        # its own files, stdout offset, stderr offset); `pipefarm logs --follow` reads it from
        # the live file serve_pipe writes for tasks that run long enough to be followed
        self.live: tuple[int, int, str, int, int] | None = None

    def __call__(self, lease: Lease, extra_env: dict[str, str] | None = None) -> Finished:
        spec = self.specs[lease.spec]
        if spec.kind == PY:
            from .execute.py import load_callable, run_python

            fn = self._fns.get(lease.spec)
            if fn is None:
                try:
                    fn = self._fns[lease.spec] = load_callable(spec.payload)
                except Exception as exc:
                    now = time.time()
                    return Finished(
                        lease.task, lease.token, int(Outcome.FAILED), now, now,
                        error=f"cannot load the task's function here: {type(exc).__name__}: {exc}",
                        attempt=lease.attempt,
                    )
            # pf.checkpoint.save/load act for this task while it runs
            checkpoint.begin(self.run_dir, lease.task, lease.attempt)
            try:
                memory = spec.resources.memory  # a limit: MemoryError past it, outcome oom
                if not self.capture_py:
                    f = run_python(fn, lease, memory)
                else:
                    f = self._run_py_captured(run_python, fn, lease, memory)
            except BaseException:  # stopped (Ctrl-C, a timeout): its checkpoints stay
                checkpoint.end(succeeded=False, keep=True)
                raise
            return _checkpoints_ended(f, spec)
        if spec.kind == CMD:
            self._py_ends = None  # its output moves the ends of the shared files
            if not spec.checkpoint_dir:  # no directory: nothing to make or remove
                return self._run_cmd(spec, lease, extra_env)
            return _checkpoints_ended(self._run_cmd(spec, lease, extra_env), spec)
        now = time.time()
        return Finished(lease.task, lease.token, int(Outcome.FAILED), now, now,
                        error=f"unknown task kind {spec.kind!r}", attempt=lease.attempt)

    def _run_py_captured(self, run_python: Callable[..., Finished], fn: Callable[..., Any],
                         lease: Lease, memory: int | None) -> Finished:
        """Run a Python task and attribute what it wrote on fds 1 and 2 to its attempt (an
        output reference :func:`~pipefarm.execute.output.read_output` reads, like a command's).

        Costs two lseek calls and two flushes per task when nothing is printed (measured in
        W1); the files are only fsynced (in :meth:`sync`) when a task printed something.
        ``run_python`` is passed in, already imported: an import statement per task would
        cost as much as the capture itself.
        """
        start = self._py_ends if self._py_ends is not None else _std_ends()
        if start is not None:
            self.live = (lease.task, lease.attempt, "s", start[0], start[1])
        f = run_python(fn, lease, memory)
        if start is None:
            return f
        end = _std_ends()
        self._py_ends = end
        if end is None or end == start:
            return f
        self._py_wrote = True
        ext = [f"{a}+{b - a}" if b > a else "" for a, b in zip(start, end, strict=True)]
        f.output = f"s{ext[0]}/{ext[1]}/{self.worker_id}"
        return f

    def _being_stopped(self) -> bool:
        return self.stopping is not None and self.stopping.wait(STOP_GRACE_S)

    def sync(self) -> None:
        """Make the command output written so far durable (before its offsets are reported)."""
        if self._sink is not None:
            self._sink.sync()
        if self._py_wrote:
            self._py_wrote = False
            for fd in (1, 2):
                try:
                    os.fsync(fd)
                except OSError:
                    pass

    def _cmd_starts(self, lease: Lease, per_task: bool) -> tuple[int, int, str, int, int]:
        """Where a command attempt's output will start: its own files from 0, or the ends of
        this worker's shared files (the worker runs one attempt at a time)."""
        from .execute.output import SUFFIXES

        if per_task or self._sink.per_task:
            return (lease.task, lease.attempt, "t", 0, 0)
        ends = []
        for suffix in SUFFIXES:
            try:
                ends.append(os.stat(self._sink.log_dir / (self.worker_id + suffix)).st_size)
            except OSError:
                ends.append(0)
        return (lease.task, lease.attempt, "s", ends[0], ends[1])

    def _run_cmd(self, spec: Spec, lease: Lease, extra_env: dict[str, str] | None) -> Finished:
        from .execute.cmd import run_command
        from .execute.output import OutputSink
        from .execute.template import decode_command, decode_values

        cmd = self._cmds.get(lease.spec)
        if cmd is None:
            cmd = self._cmds[lease.spec] = decode_command(spec.payload)
        if self._sink is None:
            logs = Path(self.run_dir or ".") / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            self._sink = OutputSink(logs, self.worker_id, per_task=cmd.output_per_task)
        values = decode_values(lease.args) if lease.args else {}
        try:
            ckpt_dir = (checkpoint.command_directory(self.run_dir, lease.task, lease.attempt)
                        if spec.checkpoint_dir else None)
        except OSError as exc:  # e.g. a full disk: the command would find no directory
            now = time.time()
            return Finished(lease.task, lease.token, int(Outcome.FAILED), now, now,
                            error=f"cannot create its checkpoint directory: {exc}",
                            attempt=lease.attempt)
        if ckpt_dir is not None:
            extra_env = {**(extra_env or {}), checkpoint.CHECKPOINT_DIR_ENV: ckpt_dir}
        self.live = self._cmd_starts(lease, cmd.output_per_task)
        res = run_command(
            cmd, values, timeout=spec.timeout, sink=self._sink, task=lease.task,
            attempt=lease.attempt, extra_env=extra_env, memory=spec.resources.memory,
        )
        stop_sig = stop_signal_of(res.exit_code) if not res.timed_out else None
        if res.oom:
            outcome = Outcome.OOM
            error = res.stderr_tail  # what went past the limit, then the command's stderr
        elif res.timed_out:
            outcome = Outcome.TIMED_OUT
            error = f"timed out after {spec.timeout:g} s; its process group was killed"
        elif res.exit_code == 0:
            outcome, error = Outcome.SUCCEEDED, None
        elif stop_sig is not None and self._being_stopped():
            outcome = Outcome.LOST
            error = (f"lost: killed by {signal_label(stop_sig)} while its worker was being stopped"
                     " (scheduler cancel, preemption, walltime or Ctrl-C); it runs again")
        else:
            outcome = Outcome.FAILED
            error = f"exit code {res.exit_code}" + (f"\n{res.stderr_tail}" if res.stderr_tail else "")
        return Finished(
            lease.task, lease.token, int(outcome), res.started_at, res.ended_at, None,
            error=error, exit_code=res.exit_code, note=res.note, output=res.output,
            attempt=lease.attempt, peak_memory=res.peak_memory,
        )


def _checkpoints_ended(f: Finished, spec: Spec) -> Finished:
    """The attempt ``f`` ended: its task's checkpoints go if it succeeded (unless the spec
    keeps them); a damaged checkpoint it skipped is named in its note."""
    note = checkpoint.end(f.outcome == Outcome.SUCCEEDED, spec.keep_checkpoints)
    if note:
        f.note = f"{f.note}; {note}" if f.note else note
    return f


def _std_ends() -> tuple[int, int] | None:
    """Where this process's stdout and stderr files end, after flushing Python's buffers
    (None when a task closed or replaced them: its output is then not attributed)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    try:
        return os.lseek(1, 0, os.SEEK_END), os.lseek(2, 0, os.SEEK_END)
    except OSError:
        return None


#: A task is announced for `pipefarm logs --follow` once it has run this long: a file written
#: per task would cost W1's 100k no-op tasks more than the whole engine does per task.
LIVE_AFTER_S = 0.2


# --- the local backend's pipe protocol ------------------------------------------------------------
class Batch(msgspec.Struct, array_like=True, tag=1):
    """Coordinator -> worker: leases to run in order, new specs, and environment for them."""

    id: int
    leases: list[Lease]
    specs: dict[int, bytes] = {}
    env: dict[str, str] | None = None


class Revoke(msgspec.Struct, array_like=True, tag=2):
    """Coordinator -> worker: hand back leases not started yet, for ``thieves`` idle workers.

    The worker gives back ``ceil(unstarted * thieves / (thieves + 1))`` leases from the end of
    its queue (its share and theirs) and answers at once with :class:`Revoked`.
    """

    thieves: int = 1


class Done(msgspec.Struct, array_like=True, tag=1):
    """Worker -> coordinator: how leases of a batch ended.

    Plain successes travel as rows ready for the store (:data:`~pipefarm.task.SuccessRow`),
    everything else as :class:`~pipefarm.task.Finished`; ``busy`` is the time spent in tasks.
    ``final`` is False for a report sent while a long task of the batch is still running.
    """

    id: int
    ok: list[tuple[int, int, int, float, float, bytes | None, str, int | None]]
    others: list[Finished]
    busy: float
    final: bool = True


class Revoked(msgspec.Struct, array_like=True, tag=2):
    """Worker -> coordinator: the tasks a :class:`Revoke` took back. This worker has not
    started them and never will; no other message of it mentions them."""

    tasks: list[int]


#: A task running longer than this has the outcomes finished before it reported at once, so
#: they are committed (durable) without waiting for the end of the batch.
FLUSH_AFTER_S = 0.05


to_worker_decoder = msgspec.msgpack.Decoder(Batch | Revoke | None)
from_worker_decoder = msgspec.msgpack.Decoder(Done | Revoked)
_encoder = msgspec.msgpack.Encoder()


class _LeaseQueue:
    """Leases waiting to run, in order, as ``(batch id, lease, env)``.

    Taking the next lease to start and taking leases back for a :class:`Revoke` happen under one
    lock, so a lease is either started here or handed back, never both.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.items: collections.deque[tuple[int, Lease, dict[str, str] | None]] = collections.deque()
        self.closed = False

    def put(self, batch: Batch) -> None:
        with self.cond:
            self.items.extend((batch.id, lz, batch.env) for lz in batch.leases)
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()

    def next(self, block: bool) -> tuple[int, Lease, dict[str, str] | None] | None:
        """The next lease to start (it can no longer be taken back), or None: when ``block``,
        only once the queue is closed and empty."""
        with self.cond:
            while block and not self.items and not self.closed:
                self.cond.wait()
            return self.items.popleft() if self.items else None

    def take_back(self, thieves: int) -> list[int]:
        """Remove the idle workers' share of the unstarted leases from the end; their tasks."""
        with self.cond:
            n = len(self.items)
            k = -(-n * thieves // (thieves + 1))
            taken = [self.items.pop()[1].task for _ in range(k)]
        taken.reverse()
        return taken


def serve_pipe(rfd: int, wfd: int, slots: Slots, index: int, run_dir: str | None, worker_id: str,
               capture_py: bool = False) -> None:
    """Run leases from ``rfd`` in order until it closes or a ``None`` message arrives.

    ``capture_py``: fds 1 and 2 go to this worker's log files; Python tasks' output is
    attributed to their attempts (see :class:`LeaseRunner`)."""
    from multiprocessing.connection import Connection

    conn_in = Connection(rfd, writable=False)
    conn_out = Connection(wfd, readable=False)
    specs: dict[int, Spec] = {}
    run = LeaseRunner(run_dir, worker_id, specs, capture_py=capture_py)
    spec_decoder = msgspec.msgpack.Decoder(Spec)
    leases = _LeaseQueue()
    report = _Reporter(conn_out, worker_id)

    # A reader thread drains the coordinator's pipe at once, so that the coordinator never
    # blocks sending a batch while this worker blocks sending results (both pipes full), and
    # so that a Revoke is answered while a long task runs.
    def read() -> None:
        try:
            while True:
                msg = to_worker_decoder.decode(conn_in.recv_bytes())
                if msg is None:
                    break
                if isinstance(msg, Revoke):
                    report.revoked(leases.take_back(max(1, msg.thieves)))
                    continue
                for sid, blob in msg.specs.items():  # before its leases can be started
                    specs[sid] = spec_decoder.decode(blob)
                leases.put(msg)
        except (EOFError, OSError, msgspec.DecodeError):
            pass
        finally:
            leases.close()

    threading.Thread(target=read, name="pipefarm-inbox", daemon=True).start()
    if run_dir is not None:
        from .execute.output import LIVE_SUFFIX, write_live

        live_path = os.path.join(run_dir, "logs", worker_id + LIVE_SUFFIX)
        written: list[Any] = [None]

        def note_live() -> None:
            """A task running for LIVE_AFTER_S: say where its output starts (for --follow)."""
            info, since = run.live, report.running_since
            if (info is None or info is written[0] or not since or info[0] != report.running_task
                    or time.time() - since < LIVE_AFTER_S):
                return
            write_live(live_path, info)
            written[0] = info

        report.on_tick = note_live
    threading.Thread(target=report.flush_loop, name="pipefarm-flush", daemon=True).start()
    current: int | None = None  # the batch whose outcomes the reporter collects
    while True:
        item = leases.next(block=False)
        if item is None or item[0] != current:
            if current is not None:  # nothing more of that batch will run here: report it
                run.sync()
                report.send(final=True)
                current = None
            if item is None:
                item = leases.next(block=True)
                if item is None:
                    report.stop = True
                    return
            current = item[0]
            report.begin(current)
        _, lease, env = item
        t0 = time.time()
        slots.set(index, lease.task, t0)
        report.running_task = lease.task
        report.running_since = t0
        f = run(lease, env)
        report.running_since = 0.0
        slots.clear(index)
        report.add(f)


class _Reporter:
    """Collects a batch's outcomes and sends them; a thread sends early during a long task."""

    def __init__(self, conn_out: Any, worker_id: str) -> None:
        self.conn_out = conn_out
        self.worker_id = worker_id
        self.lock = threading.Lock()
        self.batch = 0
        self.ok: list[tuple] = []
        self.others: list[Finished] = []
        self.busy = 0.0
        self.running_since = 0.0
        self.running_task = 0
        self.stop = False
        self.on_tick: Callable[[], None] | None = None

    def begin(self, batch: int) -> None:
        with self.lock:
            self.batch = batch

    def add(self, f: Finished) -> None:
        with self.lock:
            self.busy += f.ended_at - f.started_at
            if (
                f.outcome == Outcome.SUCCEEDED and f.error is None and f.note is None and f.output is None
                and f.exit_code is None and (f.result is None or len(f.result) <= INLINE_RESULT_MAX)
            ):
                self.ok.append((f.task, f.token, f.attempt, f.started_at, f.ended_at, f.result,
                                self.worker_id, f.peak_memory))
            else:
                self.others.append(f)

    def send(self, final: bool) -> None:
        with self.lock:
            if not final and not (self.ok or self.others):
                return
            msg = _encoder.encode(Done(self.batch, self.ok, self.others, self.busy, final))
            self.ok, self.others, self.busy = [], [], 0.0
            self.conn_out.send_bytes(msg)

    def revoked(self, tasks: list[int]) -> None:
        """Tell the coordinator which tasks were handed back (possibly none)."""
        with self.lock:
            self.conn_out.send_bytes(_encoder.encode(Revoked(tasks)))

    def flush_loop(self) -> None:
        while not self.stop:
            time.sleep(FLUSH_AFTER_S / 2)
            if self.on_tick is not None:
                try:
                    self.on_tick()
                except OSError:
                    pass  # a full disk: --follow shows the output once the attempt ends
            since = self.running_since
            if since and time.time() - since > FLUSH_AFTER_S and (self.ok or self.others):
                try:
                    self.send(final=False)
                except OSError:
                    return


def local_worker_main(rfd: int, wfd: int, slots_file: str, n_slots: int, index: int,
                      run_dir: str | None, worker_id: str, output: str | None) -> None:
    """Body of a local worker process, forked or freshly started."""
    die_with_parent()
    reset_inherited_signals()
    # SIGINT: the coordinator decides what Ctrl-C means; the worker only notes it (a command
    # that dies of it meanwhile is then lost, not failed). SIGTERM/SIGHUP end the worker at
    # once; the coordinator tells from its exit status what happened to the running task.
    stop_on(signal.SIGINT)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    if output:
        # ``output`` is the log folder: stdout and stderr are appended to the files this
        # worker's command output goes to (execute.output.OutputSink), so Python tasks'
        # output is attributed per attempt by offsets, and a worker makes two files, not three
        from .execute.output import SUFFIXES

        for target, suffix in zip((1, 2), SUFFIXES, strict=True):
            path = os.path.join(output, worker_id + suffix)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            os.dup2(fd, target)
            os.close(fd)
        # a print() shows at once (for `pipefarm logs --follow`), as it would on a terminal
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
            except (AttributeError, ValueError):
                pass
    slots = Slots(slots_file, n_slots)
    serve_pipe(rfd, wfd, slots, index, run_dir, worker_id, capture_py=bool(output))
    if output:  # a worker that printed nothing leaves no empty files behind
        from .execute.output import LIVE_SUFFIX, SUFFIXES

        try:
            os.unlink(os.path.join(output, worker_id + LIVE_SUFFIX))
        except OSError:
            pass

        for target, suffix in zip((1, 2), SUFFIXES, strict=True):
            try:
                if os.fstat(target).st_size == 0:
                    os.unlink(os.path.join(output, worker_id + suffix))
            except OSError:
                pass


def main(argv: list[str] | None = None) -> None:
    """``python -m pipefarm.worker --local RFD WFD SLOTS N INDEX RUN_DIR WORKER_ID OUTPUT``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--local"]:
        rfd, wfd, slots_file, n, index, run_dir, worker_id, output = argv[1:9]
        local_worker_main(int(rfd), int(wfd), slots_file, int(n), int(index),
                          run_dir or None, worker_id, output or None)
        return
    raise SystemExit("usage: python -m pipefarm.worker --local ... (started by pipefarm itself)")


if __name__ == "__main__":
    main()

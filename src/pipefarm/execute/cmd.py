"""Running one attempt of a command task (kind ``cmd``): :func:`run_command`.

:func:`run_command` renders the task's :class:`~pipefarm.execute.template.Command` with its
values, runs the result in its own session and process group, streams its output into an
:class:`~pipefarm.execute.output.OutputSink`, enforces the timeout on the whole process group
and never raises for a failing command: every way a command can fail ends up in the returned
:class:`CmdResult`. Each group is reported to the worker's guardian
(:mod:`pipefarm.execute.guard`) while it runs, so that it does not outlive a dying worker.

Stopping an attempt goes through the steps of :class:`Phase`::

    RUNNING ──(timeout, abort, or output held after exit)──> TERM_SENT
    TERM_SENT ──(kill grace over)──> KILL_SENT ──(1 s more)──> stop reading
"""

from __future__ import annotations

import enum
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import msgspec

from .guard import KILL_GRACE, child_preexec, forget_group, start_guardian, watch_group
from .memory import METER, GroupWatch, format_memory, group_members
from .template import Command, TemplateError, render, render_cwd

if TYPE_CHECKING:
    from .output import OutputSink

#: stderr kept for :attr:`CmdResult.stderr_tail`: at most this many bytes and lines.
TAIL_BYTES = 2048
TAIL_LINES = 20
#: Exit codes for commands that could not be started, as a POSIX shell reports them.
EXIT_NOT_FOUND = 127
EXIT_CANNOT_RUN = 126

_READ = 1 << 16  # one pipe buffer
_FLUSH_EVERY = 1.0  # seconds: buffered output reaches the log at least this often (live tail)


class CmdResult(msgspec.Struct):
    """How one attempt of a command ended.

    ``exit_code`` is the process's status (negative: killed by that signal; 127/126: it could
    not be started; None: it was never started). ``output`` is a reference for
    :func:`pipefarm.execute.output.read_output` (None when the attempt printed nothing).
    ``stderr_tail`` is filled only when the attempt did not succeed. ``oom``: its process
    group went past its memory limit and was killed; ``peak_memory``: resident bytes at its
    peak (None when it could not be measured).
    """

    exit_code: int | None
    timed_out: bool
    started_at: float
    ended_at: float
    stderr_tail: str
    note: str | None
    output: str | None
    oom: bool = False
    peak_memory: int | None = None

    @property
    def ok(self) -> bool:
        """Whether the attempt succeeded (exit status 0 within its time and memory)."""
        return self.exit_code == 0 and not self.timed_out and not self.oom


class Phase(enum.Enum):
    """Where an attempt is in being stopped."""

    RUNNING = 0  # not asked to stop
    TERM_SENT = 1  # its group got SIGTERM; SIGKILL follows after the kill grace
    KILL_SENT = 2  # its group got SIGKILL; reading stops a second later at most


_devnull_fd = -1
#: Longest single wait of the output loop (seconds): below poll()'s limit of 2**31-1 ms.
_MAX_POLL_S = 86400.0


def _forget_devnull_after_fork() -> None:
    # a forked local worker closes the fds it inherits: the parent's /dev/null fd number may
    # be closed, or reused by another file, in the child
    global _devnull_fd
    _devnull_fd = -1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_devnull_after_fork)


def _devnull() -> int:
    global _devnull_fd
    if _devnull_fd < 0:  # one shared fd instead of an open/close per task
        _devnull_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return _devnull_fd


def _child_env(cmd: Command, extra: dict[str, str] | None, task: int, attempt: int) -> dict:
    data = getattr(os.environ, "_data", None)
    if isinstance(data, dict) and os.name == "posix":
        # CPython keeps os.environ as a bytes->bytes dict: copying that and handing bytes to
        # Popen skips decoding and re-encoding every variable (~0.1 ms, ~8% of a `true` task)
        env: dict = dict(data)
        enc = os.fsencode
        for more in (cmd.env, extra):
            if more:
                for k, v in more.items():
                    env[enc(k)] = enc(v)
        env[b"PIPEFARM_TASK_ID"] = b"%d" % task
        env[b"PIPEFARM_ATTEMPT"] = b"%d" % attempt
        return env
    env = os.environ.copy()
    if cmd.env:
        env.update(cmd.env)
    if extra:
        env.update(extra)
    env["PIPEFARM_TASK_ID"] = str(task)
    env["PIPEFARM_ATTEMPT"] = str(attempt)
    return env


def _tail(data: bytes, truncated: bool) -> str:
    if truncated:  # started mid-line (maybe mid-character): drop the partial first line
        nl = data.find(b"\n")
        if 0 <= nl < len(data) - 1:
            data = data[nl + 1 :]
    text = data.decode("utf-8", "replace").rstrip("\n")
    lines = text.split("\n")
    return "\n".join(lines[-TAIL_LINES:])


def _killpg(pgid: int, sig: int) -> bool:
    """Signal a process group; False when it no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # only a zombie member left that init has not reaped yet, etc.
        return True


def _group_alive(pgid: int) -> bool:
    """Whether a process group has a member that is not a zombie.

    killpg(pgid, 0) cannot tell: zombies count as members, and some init processes (this
    one included: a VM's process_api) reap orphans only about once a second. It runs only
    after a SIGTERM or SIGKILL, so psutil is imported here, not with the module.
    """
    import psutil

    for pid in group_members(pgid):
        try:
            # a zombie still has its group: only a member's status says whether it runs
            if psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                return True
        except (OSError, psutil.Error):
            continue  # gone meanwhile, or not ours to look at
    return False


def _reap(proc: Any) -> tuple[int, int | None]:
    """Reap an exited child with ``wait4``: its exit code and its ``ru_maxrss`` in bytes
    (the largest of it and the descendants it reaped; None when Popen reaped it already)."""
    if proc.returncode is not None:
        return proc.returncode, None
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except ChildProcessError:  # reaped elsewhere meanwhile
        return proc.wait(), None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024  # KiB on Linux


def _start_failure(
    out: Any, started: float, code: int | None, message: str, note: str | None = None
) -> CmdResult:
    ref, out_note = out.finish()
    notes = "; ".join(n for n in (note, out_note) if n) or None
    return CmdResult(
        exit_code=code,
        timed_out=False,
        started_at=started,
        ended_at=time.time(),
        stderr_tail=message,
        note=notes,
        output=ref,
    )


def run_command(
    cmd: Command,
    values: dict[str, str],
    *,
    timeout: float | None,
    sink: OutputSink,
    task: int,
    attempt: int,
    extra_env: dict[str, str] | None = None,
    kill_grace: float = KILL_GRACE,
    abort: threading.Event | None = None,
    memory: int | None = None,
) -> CmdResult:
    """Run one attempt of a command task and report how it ended; never raises for the command.

    The child runs in its own session (process group) with stdin from /dev/null, the worker's
    environment plus ``cmd.env``, ``extra_env`` (e.g. GPU variables) and ``PIPEFARM_TASK_ID`` /
    ``PIPEFARM_ATTEMPT``. On timeout (or when ``abort`` is set) the whole group gets SIGTERM,
    then SIGKILL after ``kill_grace`` seconds. With ``memory`` (bytes), a group whose summed
    resident memory passes it is killed at once (SIGKILL: no grace while memory is short) and
    the result says ``oom``. When the main process exits, anything it left running in its
    group is killed too: a task's processes end with the task.
    PDEATHSIG note: in ``pdeathsig`` mode the child dies when the *thread* that started it
    exits, so call this from long-lived threads.
    """
    import select
    import signal
    import subprocess

    started = time.time()
    out = sink.attempt(task, attempt, cmd.output_cap, True if cmd.output_per_task else None)
    try:
        argv = render(cmd, values)
        cwd = render_cwd(cmd, values)
    except TemplateError as exc:
        return _start_failure(out, started, None, f"pipefarm: {exc}")
    env = _child_env(cmd, extra_env, task, attempt)
    start_guardian()
    # the kernel hands the command, at exec, the high-water mark of the worker that started
    # it (its ru_maxrss starts there): from the worker's memory now, not from its largest
    # earlier task
    METER.reset()

    r_out, w_out = os.pipe()
    r_err, w_err = os.pipe()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=_devnull(),
            stdout=w_out,
            stderr=w_err,
            cwd=cwd,
            env=env,
            start_new_session=True,
            preexec_fn=child_preexec(),
        )
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        os.close(r_out)
        os.close(r_err)
        return _start_failure(out, started, *_explain_start_failure(exc, argv, cwd))
    finally:
        os.close(w_out)
        os.close(w_err)
    pgid = proc.pid  # setsid() made the child the leader of a new session and group
    watch_group(pgid)

    fds = {r_out: 0, r_err: 1}
    for fd in fds:
        os.set_blocking(fd, False)
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    try:
        pidfd = os.pidfd_open(proc.pid)  # readable when the child exits, without reaping it
        poller.register(pidfd, select.POLLIN)
    except (AttributeError, OSError):
        pidfd = -1  # no pidfd (macOS, old kernel): fall back to polling proc.poll()

    err_tail = bytearray()
    tail_cut = False
    notes: list[str] = []
    exited = False
    timed_out = False
    phase = Phase.RUNNING
    t0 = time.monotonic()
    deadline = None if timeout is None else t0 + timeout
    watch = None if memory is None else GroupWatch(pgid, memory, t0)
    oom = ""  # why the group was killed for its memory (empty: it was not)
    kill_at = give_up_at = 0.0
    last_flush = t0

    def read(fd: int) -> bool:
        """Read what fd has; False at EOF (then fd is closed and forgotten)."""
        nonlocal err_tail, tail_cut
        while True:
            try:
                data = os.read(fd, _READ)
            except BlockingIOError:
                return True
            if not data:
                poller.unregister(fd)
                os.close(fd)
                del fds[fd]
                return False
            stream = fds[fd]
            out.write(stream, data)
            if stream == 1:
                err_tail += data
                if len(err_tail) > 2 * TAIL_BYTES:
                    del err_tail[:-TAIL_BYTES]
                    tail_cut = True
            if len(data) < _READ:
                return True  # pipe drained for now; let poll() say when there is more

    def stop(why: str) -> None:
        nonlocal phase, kill_at
        phase = Phase.TERM_SENT
        kill_at = time.monotonic() + kill_grace
        _killpg(pgid, signal.SIGTERM)
        _killpg(pgid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
        notes.append(why)

    try:
        while fds or not exited:
            now = time.monotonic()
            if phase is Phase.RUNNING:
                if deadline is not None and now >= deadline:
                    timed_out = True
                    stop(f"timed out after {timeout:g} s; process group stopped")
                elif watch is not None and watch.over(now):
                    _killpg(pgid, signal.SIGKILL)
                    phase = Phase.KILL_SENT
                    give_up_at = now + 1.0
                    oom = (f"went past its memory limit of {format_memory(watch.limit)}"
                           f" ({format_memory(watch.peak)} resident); its process group was killed")
                elif abort is not None and abort.is_set():
                    stop("aborted by the worker; process group stopped")
                elif exited and fds:
                    for fd in list(fds):  # what the main process wrote before exiting
                        read(fd)
                    if fds:  # still open: something it started holds the pipe
                        stop("the command exited but left processes holding its output; killed")
            elif phase is Phase.TERM_SENT and now >= kill_at:
                _killpg(pgid, signal.SIGKILL)
                phase = Phase.KILL_SENT
                give_up_at = now + 1.0
            elif phase is Phase.KILL_SENT and now >= give_up_at:
                # only a process outside the group (it called setsid) can still hold the pipes
                notes.append("output kept open by a process outside the task; stopped reading")
                break
            if not (fds or not exited):
                break

            wait = None
            if phase is Phase.RUNNING:
                if deadline is not None:
                    wait = deadline - now
                if abort is not None:
                    wait = 0.1 if wait is None else min(wait, 0.1)
                if watch is not None:
                    w = watch.next_at - now
                    wait = w if wait is None else min(wait, w)
            elif phase is Phase.TERM_SENT:
                wait = kill_at - now
            else:
                wait = give_up_at - now
            if pidfd < 0 and not exited:
                wait = 0.05 if wait is None else min(wait, 0.05)
            if out.pending():
                w = last_flush + _FLUSH_EVERY - now
                wait = w if wait is None else min(wait, w)
            # poll() takes a C int of milliseconds: a timeout of 24.9 days or more would
            # overflow it, so wait at most a day per turn (the loop recomputes the rest)
            ms = None if wait is None else max(0, int(min(wait, _MAX_POLL_S) * 1000) + 1)

            for fd, _ev in poller.poll(ms):
                if fd == pidfd:
                    exited = True
                    poller.unregister(pidfd)
                elif fd in fds:
                    read(fd)
            if pidfd < 0 and not exited:
                exited = proc.poll() is not None
            if out.pending() and time.monotonic() - last_flush >= _FLUSH_EVERY:
                out.flush()
                last_flush = time.monotonic()
    except BaseException:
        # KeyboardInterrupt, a signal handler's exception: never leave the group behind
        _killpg(pgid, signal.SIGKILL)
        try:
            proc.wait(kill_grace + 1.0)
            forget_group(pgid)
        except BaseException:
            pass  # stuck, or a second Ctrl-C: the guardian still knows the group
        for fd in fds:
            os.close(fd)
        if pidfd >= 0:
            os.close(pidfd)
        out.finish()
        raise

    for fd in fds:  # only after giving up on a pipe held from outside the group
        os.close(fd)
    if pidfd >= 0:
        os.close(pidfd)
    peak: int | None = None
    try:
        # exited: reaps at once. Otherwise we gave up after SIGKILL: a process stuck in
        # uninterruptible I/O (a hung NFS mount) ignores even SIGKILL; do not hang the worker.
        if exited:
            code, peak = _reap(proc)
        else:
            code = proc.wait(1.0)
    except subprocess.TimeoutExpired:
        code = None
        notes.append("the process did not end even after SIGKILL (stuck in the kernel?)")
    if watch is not None and watch.peak > (peak or 0):
        peak = watch.peak
    # Whatever is left in the group now (background jobs that did not hold the pipes) ends
    # with the task. After a normal exit no grace: the task is over. After SIGTERM, the rest
    # of the grace. killpg(0) is one syscall and fails (ESRCH) in the common case.
    if _killpg(pgid, 0):
        if phase is Phase.TERM_SENT:
            while time.monotonic() < kill_at and _group_alive(pgid):
                time.sleep(0.02)
        _killpg(pgid, signal.SIGKILL)
        # SIGKILL is asynchronous: wait (briefly) until the members are really gone, so
        # that "the attempt ended" means "its processes are gone"
        end = time.monotonic() + 1.0
        while _group_alive(pgid) and time.monotonic() < end:
            time.sleep(0.005)
    if code is not None:
        forget_group(pgid)  # a stuck group stays listed: the guardian kills it if we die

    ref, out_note = out.finish()
    if out_note:
        notes.append(out_note)
    ok = code == 0 and not timed_out and not oom
    tail = ""
    if not ok:  # successes do not need it, and it would cost catalog space per task
        tail = _tail(bytes(err_tail[-TAIL_BYTES:]), tail_cut or len(err_tail) > TAIL_BYTES)
    if oom:  # the reason first: the command's own last words follow it
        tail = f"{oom}\n{tail}" if tail else oom
    return CmdResult(
        exit_code=code,
        timed_out=timed_out,
        started_at=started,
        ended_at=time.time(),
        stderr_tail=tail,
        note="; ".join(notes) or None,
        output=ref,
        oom=bool(oom),
        peak_memory=peak,
    )


def _explain_start_failure(
    exc: BaseException, argv: list[str], cwd: str | None
) -> tuple[int, str]:
    """Exit code and message for a command that could not be started (as a shell would)."""
    prog = argv[0] if argv else ""
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        if cwd is not None and exc.filename == cwd:
            return EXIT_CANNOT_RUN, f"pipefarm: cannot enter working directory {cwd!r}: {reason}"
        if isinstance(exc, FileNotFoundError):
            where = "" if "/" in prog else " (searched PATH)"
            return EXIT_NOT_FOUND, f"pipefarm: command not found: {prog!r}{where}"
        return EXIT_CANNOT_RUN, f"pipefarm: cannot run {prog!r}: {reason}"
    return EXIT_CANNOT_RUN, f"pipefarm: cannot run {prog!r}: {exc}"

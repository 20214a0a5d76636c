"""Command tasks (kind ``cmd``): templates, rendering and running one attempt of a command.

A :class:`Command` is the template every task of a group shares (stored as ``Spec.payload``);
each task carries only its placeholder values (stored as the task's args, see
:func:`encode_values`). :func:`run_command` runs one attempt in its own session and process
group, streams its output into an :class:`~pipefarm.execute.output.OutputSink`, enforces the
timeout on the whole process group and never raises for a failing command: every way a command
can fail ends up in the returned :class:`CmdResult`.

Children do not outlive their worker. ``PR_SET_PDEATHSIG`` needs a ``preexec_fn``, and a
``preexec_fn`` forces CPython off its ``vfork`` fast path onto a full ``fork`` (posix_spawn is
already ruled out by ``start_new_session``): measured on the 2-core development machine it cut
spawn throughput of ``true`` from ~1,100/s to ~320/s per worker, and to ~50/s in a worker
holding 500 MiB (``fork`` copies page tables). PDEATHSIG also kills only the direct child, not
what it started, and fires when the spawning *thread* exits. So by default each worker process
starts one tiny *guardian* process (see :data:`CHILD_GUARD`) that learns every task's process
group through a pipe and, when the worker dies (the pipe reaches EOF), stops those whole
groups (SIGTERM, grace, SIGKILL); its cost does not show in the spawn rate.
``PIPEFARM_CHILD_GUARD=pdeathsig`` selects the ``prctl`` way instead, ``none`` neither.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import threading
import time
from collections.abc import Iterable
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from .output import OutputSink

#: Bytes of stdout and of stderr captured per attempt unless the Command says otherwise.
DEFAULT_OUTPUT_CAP = 1 << 20
#: Seconds between SIGTERM and SIGKILL when a task's process group is stopped.
KILL_GRACE = 2.0
#: stderr kept for :attr:`CmdResult.stderr_tail`: at most this many bytes and lines.
TAIL_BYTES = 2048
TAIL_LINES = 20
#: Exit codes for commands that could not be started, as a POSIX shell reports them.
EXIT_NOT_FOUND = 127
EXIT_CANNOT_RUN = 126

_READ = 1 << 16  # one pipe buffer
_FLUSH_EVERY = 1.0  # seconds: buffered output reaches the log at least this often (live tail)


class TemplateError(KeyError):
    """A command template that cannot be rendered: a missing value or bad placeholder syntax."""

    def __str__(self) -> str:  # KeyError would show repr() of the message, quotes and all
        return str(self.args[0]) if self.args else ""


class Command(msgspec.Struct, omit_defaults=True):
    """The template of a command task: an argv list or a shell line, plus how to run it.

    Placeholders are ``{name}`` (an identifier), ``{N}`` (digits) and ``{}`` (the only value
    of a single-column source), and may carry a format spec applied to the value as a number
    when it looks like one (``{index:05d}``). Any other brace is literal, so shell and awk
    text needs no escaping (``awk '{print $1}'``, ``{ echo x; exit 7; }``); a ``{`` right
    after ``$`` is always literal (the shell's ``${VAR}``); ``{{`` and ``}}`` are one literal
    brace each (so write awk's ``}}`` as ``} }``).
    In ``argv`` mode a value becomes part of exactly one argv element; no shell is involved.
    In ``shell`` mode each value is quoted with :func:`shlex.quote` before it goes into the
    line, which runs under ``/bin/sh -c`` -- so do not put placeholders inside quotes there.
    ``cwd`` may contain placeholders too (a per-task working directory); ``env`` is literal.
    """

    argv: list[str] | None = None
    shell: str | None = None
    cwd: str | None = None
    env: dict[str, str] = {}
    output_cap: int = DEFAULT_OUTPUT_CAP
    output_per_task: bool = False

    def __post_init__(self) -> None:
        if (self.argv is None) == (self.shell is None):
            raise ValueError("a Command needs exactly one of argv and shell")
        if self.argv is not None and not self.argv:
            raise ValueError("a Command's argv must not be empty")
        if self.output_cap < 0:
            raise ValueError("output_cap must be >= 0 bytes")


class CmdResult(msgspec.Struct):
    """How one attempt of a command ended.

    ``exit_code`` is the process's status (negative: killed by that signal; 127/126: it could
    not be started; None: it was never started). ``output`` is a reference for
    :func:`pipefarm.execute.output.read_output` (None when the attempt printed nothing).
    ``stderr_tail`` is filled only when the attempt did not succeed.
    """

    exit_code: int | None
    timed_out: bool
    started_at: float
    ended_at: float
    stderr_tail: str
    note: str | None
    output: str | None

    @property
    def ok(self) -> bool:
        """Whether the attempt succeeded (exit status 0 within its time)."""
        return self.exit_code == 0 and not self.timed_out


# -- encoding ------------------------------------------------------------------------------

_cmd_encoder = msgspec.msgpack.Encoder()
_cmd_decoder = msgspec.msgpack.Decoder(Command)
_values_decoder = msgspec.msgpack.Decoder()  # str values, or bytes ones (see encode_values)


def encode_command(cmd: Command) -> bytes:
    """Serialise a Command template (what ``Spec.payload`` holds for kind ``cmd``)."""
    return _cmd_encoder.encode(cmd)


def decode_command(blob: bytes) -> Command:
    """Inverse of :func:`encode_command`."""
    return _cmd_decoder.decode(blob)


def encode_values(values: dict[str, str]) -> bytes:
    """Serialise one task's placeholder values (what a ``cmd`` task's args hold)."""
    try:
        return _cmd_encoder.encode(values)
    except UnicodeEncodeError:
        # Values read from files with undecodable bytes carry surrogate escapes (file names
        # on POSIX are bytes); store those values as bytes so they reach argv byte-exact.
        return _cmd_encoder.encode(
            {
                k: (v.encode("utf-8", "surrogateescape") if has_surrogates(v) else v)
                for k, v in values.items()
            }
        )


def decode_values(blob: bytes | None) -> dict[str, str]:
    """Inverse of :func:`encode_values`."""
    if not blob:
        return {}
    values = _values_decoder.decode(blob)
    if not isinstance(values, dict):
        raise ValueError("not encoded placeholder values")
    for k, v in values.items():
        if isinstance(v, bytes):
            values[k] = v.decode("utf-8", "surrogateescape")
        elif not isinstance(v, str):
            raise ValueError(f"placeholder value for {k!r} is not a string")
    return values


def has_surrogates(s: str) -> bool:
    """Whether ``s`` carries bytes that are not UTF-8 (as surrogate escapes, from argv or a file)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# -- templates -----------------------------------------------------------------------------

# What a placeholder is: {name}, {name:spec}, {N} or {} -- name an identifier, N digits, spec
# without braces. Every other brace is literal text, so ordinary shell and awk need no
# escaping: awk '{print $1}', ${HOME}, { cmd; exit 7; }. A "{" right after "$" is always
# literal (the shell's ${VAR}); "{{" and "}}" still stand for one literal brace.
_PLACEHOLDER = re.compile(r"\{(?:([^\W\d]\w*|\d+)(?::([^{}]*))?)?\}")
_BRACE = re.compile(r"[{}]")


@lru_cache(maxsize=4096)
def _parse(template: str) -> tuple[tuple[str, str | None, str], ...]:
    """``(literal, field or None, format spec)`` pieces of one template string (cached).

    ``field`` is the placeholder's name, or ``""`` for ``{}`` (the source's only value).
    Never raises: text that is not a placeholder is literal.
    """
    out: list[tuple[str, str | None, str]] = []
    literal: list[str] = []
    i, n = 0, len(template)
    while i < n:
        j = _next_brace(template, i)
        literal.append(template[i:j])
        if j >= n:
            break
        c = template[j]
        if template.startswith(c * 2, j):  # "{{" / "}}": one literal brace
            literal.append(c)
            i = j + 2
            continue
        m = _PLACEHOLDER.match(template, j) if c == "{" and template[j - 1 : j] != "$" else None
        if m is None:
            literal.append(c)
            i = j + 1
            continue
        out.append(("".join(literal), m.group(1) or "", m.group(2) or ""))
        literal = []
        i = m.end()
    if literal or not out:
        out.append(("".join(literal), None, ""))
    return tuple(out)


def _next_brace(s: str, start: int) -> int:
    m = _BRACE.search(s, start)
    return len(s) if m is None else m.start()


def _unparse(pieces: Iterable[tuple[str, str | None, str]]) -> str:
    """The template text of parsed pieces (literal braces doubled): ``_parse`` inverts it."""
    out = []
    for literal, field, spec in pieces:
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if field is not None:
            out.append("{" + field + (":" + spec if spec else "") + "}")
    return "".join(out)


def templates(cmd: Command) -> list[str]:
    """The template strings of a Command: argv elements or the shell line, then cwd."""
    return _templates(cmd)


def _templates(cmd: Command) -> list[str]:
    parts = list(cmd.argv) if cmd.argv is not None else [cmd.shell or ""]
    if cmd.cwd is not None:
        parts.append(cmd.cwd)
    return parts


def placeholders(cmd: Command) -> set[str]:
    """The placeholder names a Command uses (argv or shell line, and cwd)."""
    names: set[str] = set()
    for template in _templates(cmd):
        for _, field, _ in _parse(template):
            if field is not None:
                names.add(field)
    return names


def _apply_spec(value: str, spec: str) -> str:
    try:
        return format(value, spec)
    except ValueError:
        pass
    # "{index:05d}" on the string "7": format it as the number it spells
    for conv in (int, float):
        try:
            return format(conv(value), spec)
        except ValueError:
            continue
    raise TemplateError(f"cannot format value {value!r} with format spec {spec!r}")


def _value(field: str, values: dict[str, str]) -> str | None:
    """The value of one placeholder: ``{}`` is the row's only value (or its ``""`` entry)."""
    if field in values:
        return values[field]
    if field == "" and len(values) == 1:
        return next(iter(values.values()))
    return None


def _render(template: str, values: dict[str, str], quote: bool) -> str:
    pieces = _parse(template)
    if len(pieces) == 1 and pieces[0][1] is None:
        return pieces[0][0]  # no placeholder: the common case for most argv elements
    out = []
    for literal, field, spec in pieces:
        out.append(literal)
        if field is None:
            continue
        value = _value(field, values)
        if value is None:
            raise _missing(template, values)
        if spec:
            value = _apply_spec(value, spec)
        out.append(shlex.quote(value) if quote else value)
    return "".join(out)


def _missing(template: str, values: dict[str, str]) -> TemplateError:
    names = {f for _, f, _ in _parse(template) if f is not None}
    missing = sorted(f for f in names if _value(f, values) is None)
    have = ", ".join("{" + k + "}" for k in sorted(values)) or "none"
    extra = f"; {EMPTY_PLACEHOLDER_HINT}" if "" in missing else ""
    return TemplateError(
        f"no value for placeholder {', '.join('{' + m + '}' for m in missing)} "
        f"in {template!r}; available: {have}{extra}"
    )


#: Why ``{}`` found no value: it stands for a source's only column.
EMPTY_PLACEHOLDER_HINT = (
    "{} stands for the only value of a single-column source (--array, --from-file, a "
    "one-column CSV, one ::: list); name the column instead, e.g. {index}"
)


def literal_braces(cmd: Command) -> set[str]:
    """The texts in literal braces of a Command's templates: ``{my-col}`` gives ``my-col``.

    Such text is not a placeholder (names are identifiers); when it names a source column
    the user most likely meant it as one, and :func:`pipefarm.sources.check_template` says so.
    """
    found: set[str] = set()
    for template in _templates(cmd):
        # not after "{" or "$" and not before "}": {{x}} and ${x} are meant literally
        found.update(re.findall(r"(?<![{$])\{([^{}:]+)(?::[^{}]*)?\}(?!\})", template))
    return found


def name_default(cmd: Command, name: str) -> Command:
    """``cmd`` with every ``{}`` (spec kept) written as ``{name}``: for a source whose only
    column is ``name``, so the stored template says what it uses."""

    def fix(template: str) -> str:
        pieces = _parse(template)
        if not any(f == "" for _, f, _ in pieces):
            return template
        return _unparse((lit, name if f == "" else f, spec) for lit, f, spec in pieces)

    argv = None if cmd.argv is None else [fix(a) for a in cmd.argv]
    shell = None if cmd.shell is None else fix(cmd.shell)
    cwd = None if cmd.cwd is None else fix(cmd.cwd)
    return msgspec.structs.replace(cmd, argv=argv, shell=shell, cwd=cwd)


def render(cmd: Command, values: dict[str, str]) -> list[str]:
    """The argv to execute for one task: placeholders replaced by ``values``.

    argv mode substitutes into each element separately; shell mode substitutes quoted values
    into the line and returns ``["/bin/sh", "-c", line]``. Raises :class:`TemplateError`.
    """
    if cmd.argv is not None:
        return [_render(a, values, False) for a in cmd.argv]
    return ["/bin/sh", "-c", _render(cmd.shell or "", values, True)]


def render_cwd(cmd: Command, values: dict[str, str]) -> str | None:
    """The working directory for one task (placeholders replaced, not quoted), or None."""
    return None if cmd.cwd is None else _render(cmd.cwd, values, False)


# -- keeping children from outliving the worker --------------------------------------------

#: How children are tied to the worker's life: "guardian" (default), "pdeathsig" or "none".
CHILD_GUARD = os.environ.get("PIPEFARM_CHILD_GUARD", "guardian").strip().lower()

# The guardian: reads "+pgid" / "-pgid" lines on stdin; at EOF (the worker is gone, or closed
# the pipe) or when its parent changes, it stops every process group still listed: SIGTERM,
# grace, SIGKILL. It runs with -I -S so it starts in ~10 ms and imports nothing of ours. It
# reads in batches every 0.2 s instead of waking per message: woken per task it cost ~15% of
# spawn throughput on 2 cores, and the order of messages in the pipe already says which groups
# were alive when the pipe closed.
_GUARD_SRC = r"""
import fcntl, os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
parent, grace = int(sys.argv[1]), float(sys.argv[2])
groups, buf = set(), b""
os.set_blocking(0, False)
try:
    fcntl.fcntl(0, 1031, 1 << 20)  # F_SETPIPE_SZ: room for many messages between reads
except OSError:
    pass
def drain():
    global buf
    while True:
        try:
            data = os.read(0, 1 << 20)
        except BlockingIOError:
            return False
        if not data:
            return True
        *lines, buf = (buf + data).split(b"\n")
        for ln in lines:
            if ln[:1] == b"+":
                groups.add(int(ln[1:]))
            elif ln[:1] == b"-":
                groups.discard(int(ln[1:]))
while not drain() and os.getppid() == parent:
    time.sleep(0.2)  # no hurry: only the set at the worker's death matters
drain()  # the parent is gone: everything it wrote is in the pipe now
def send(sig):
    for g in list(groups):
        try:
            os.killpg(g, sig)
        except OSError:
            groups.discard(g)
send(signal.SIGTERM); send(signal.SIGCONT)
end = time.monotonic() + grace
while groups and time.monotonic() < end:
    time.sleep(0.05)
    send(0)
send(signal.SIGKILL)
"""


class _Guardian:
    """The worker-side end of the guardian process (one per worker process)."""

    def __init__(self) -> None:
        import subprocess

        r, self.wfd = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _GUARD_SRC, str(os.getpid()), str(KILL_GRACE)],
                stdin=r,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a kill aimed at the worker's group must spare it
            )
        finally:
            os.close(r)
        self.live: set[int] = set()

    def send(self, msg: bytes) -> None:
        os.write(self.wfd, msg)  # < PIPE_BUF: atomic, no lock needed between threads

    def close(self) -> None:
        try:
            os.close(self.wfd)
        except OSError:
            pass
        try:
            self.proc.wait(KILL_GRACE + 5)
        except Exception:
            pass


_guard: _Guardian | None = None
_guard_failed = False
_guard_lock = threading.Lock()


def _guard_start() -> None:
    """Make sure the guardian runs -- before the first task starts, so that a worker killed
    right after that task's fork already has a guardian listening."""
    global _guard, _guard_failed
    if _guard is not None or CHILD_GUARD != "guardian" or _guard_failed:
        return
    with _guard_lock:
        if _guard is None:
            try:
                _guard = _Guardian()
            except OSError:
                # no guardian (no usable sys.executable): children still end with their
                # timeouts and with run_command; do not retry for every task
                _guard_failed = True


def _guard_watch(pgid: int) -> None:
    # The one unguarded moment is between fork and this write (microseconds): a worker
    # SIGKILLed exactly then leaves that one task running.
    global _guard
    if CHILD_GUARD != "guardian" or _guard_failed:
        return
    with _guard_lock:
        if _guard is None:
            return
        _guard.live.add(pgid)
        try:
            _guard.send(b"+%d\n" % pgid)
        except OSError:  # the guardian died: start another and tell it everything again
            _guard.close()
            live = _guard.live
            try:
                _guard = _Guardian()
                _guard.live = live
                _guard.send(b"".join(b"+%d\n" % g for g in live))
            except OSError:
                _guard = None


def _guard_done(pgid: int) -> None:
    g = _guard
    if g is None or pgid not in g.live:
        return
    g.live.discard(pgid)
    try:
        g.send(b"-%d\n" % pgid)
    except OSError:
        pass


def shutdown_guard() -> None:
    """Stop this process's guardian (it kills any task group still running)."""
    global _guard
    with _guard_lock:
        if _guard is not None:
            _guard.close()
            _guard = None


def _after_fork_in_child() -> None:
    # A forked child (multiprocessing) must not keep the worker's pipe open: the guardian
    # would never see EOF. It gets its own guardian if it ever runs commands.
    global _guard, _guard_lock, _devnull_fd
    _guard_lock = threading.Lock()
    # a forked local worker closes the fds it inherits: the parent's /dev/null fd number may
    # be closed, or reused by another file, in the child
    _devnull_fd = -1
    if _guard is not None:
        try:
            os.close(_guard.wfd)
        except OSError:
            pass
        _guard = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

_prctl: Any = None


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    _prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL


def _preexec() -> Any:
    global _prctl
    if CHILD_GUARD != "pdeathsig" or not sys.platform.startswith("linux"):
        return None
    if _prctl is None:
        import ctypes

        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    return _set_pdeathsig


# -- running -------------------------------------------------------------------------------

_devnull_fd = -1
#: Longest single wait of the output loop (seconds): below poll()'s limit of 2**31-1 ms.
_MAX_POLL_S = 86400.0


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
    one included: a VM's process_api) reap orphans only about once a second. Scanning /proc
    costs about a millisecond per hundred processes; it runs only after a SIGTERM.
    """
    if not os.path.isdir("/proc/self"):
        return False  # cannot tell: the caller's SIGKILL follows at once
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


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
) -> CmdResult:
    """Run one attempt of a command task and report how it ended; never raises for the command.

    The child runs in its own session (process group) with stdin from /dev/null, the worker's
    environment plus ``cmd.env``, ``extra_env`` (e.g. GPU variables) and ``PIPEFARM_TASK_ID`` /
    ``PIPEFARM_ATTEMPT``. On timeout (or when ``abort`` is set) the whole group gets SIGTERM,
    then SIGKILL after ``kill_grace`` seconds. When the main process exits, anything it left
    running in its group is killed too: a task's processes end with the task.
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
    _guard_start()

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
            preexec_fn=_preexec(),
        )
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        os.close(r_out)
        os.close(r_err)
        return _start_failure(out, started, *_explain_start_failure(exc, argv, cwd))
    finally:
        os.close(w_out)
        os.close(w_err)
    pgid = proc.pid  # setsid() made the child the leader of a new session and group
    _guard_watch(pgid)

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
    phase = 0  # 0: running; 1: SIGTERM sent; 2: SIGKILL sent
    t0 = time.monotonic()
    deadline = None if timeout is None else t0 + timeout
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
        phase = 1
        kill_at = time.monotonic() + kill_grace
        _killpg(pgid, signal.SIGTERM)
        _killpg(pgid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
        notes.append(why)

    try:
        while fds or not exited:
            now = time.monotonic()
            if phase == 0:
                if deadline is not None and now >= deadline:
                    timed_out = True
                    stop(f"timed out after {timeout:g} s; process group stopped")
                elif abort is not None and abort.is_set():
                    stop("aborted by the worker; process group stopped")
                elif exited and fds:
                    for fd in list(fds):  # what the main process wrote before exiting
                        read(fd)
                    if fds:  # still open: something it started holds the pipe
                        stop("the command exited but left processes holding its output; killed")
            elif phase == 1 and now >= kill_at:
                _killpg(pgid, signal.SIGKILL)
                phase = 2
                give_up_at = now + 1.0
            elif phase == 2 and now >= give_up_at:
                # only a process outside the group (it called setsid) can still hold the pipes
                notes.append("output kept open by a process outside the task; stopped reading")
                break
            if not (fds or not exited):
                break

            wait = None
            if phase == 0:
                if deadline is not None:
                    wait = deadline - now
                if abort is not None:
                    wait = 0.1 if wait is None else min(wait, 0.1)
            elif phase == 1:
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
            _guard_done(pgid)
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
    try:
        # exited: reaps at once. Otherwise we gave up after SIGKILL: a process stuck in
        # uninterruptible I/O (a hung NFS mount) ignores even SIGKILL; do not hang the worker.
        code: int | None = proc.wait(None if exited else 1.0)
    except subprocess.TimeoutExpired:
        code = None
        notes.append("the process did not end even after SIGKILL (stuck in the kernel?)")
    # Whatever is left in the group now (background jobs that did not hold the pipes) ends
    # with the task. After a normal exit no grace: the task is over. After SIGTERM, the rest
    # of the grace. killpg(0) is one syscall and fails (ESRCH) in the common case.
    if _killpg(pgid, 0):
        if phase == 1:
            while time.monotonic() < kill_at and _group_alive(pgid):
                time.sleep(0.02)
        _killpg(pgid, signal.SIGKILL)
        # SIGKILL is asynchronous: wait (briefly) until the members are really gone, so
        # that "the attempt ended" means "its processes are gone"
        end = time.monotonic() + 1.0
        while _group_alive(pgid) and time.monotonic() < end:
            time.sleep(0.005)
    if code is not None:
        _guard_done(pgid)  # a stuck group stays listed: the guardian kills it if we die

    ref, out_note = out.finish()
    if out_note:
        notes.append(out_note)
    ok = code == 0 and not timed_out
    tail = ""
    if not ok:  # successes do not need it, and it would cost catalog space per task
        tail = _tail(bytes(err_tail[-TAIL_BYTES:]), tail_cut or len(err_tail) > TAIL_BYTES)
    return CmdResult(
        exit_code=code,
        timed_out=timed_out,
        started_at=started,
        ended_at=time.time(),
        stderr_tail=tail,
        note="; ".join(notes) or None,
        output=ref,
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

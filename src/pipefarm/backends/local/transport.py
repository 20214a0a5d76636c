"""The local transport: worker processes on this host, fed through pipes.

Each worker is a process started by ``fork`` (fast: no interpreter start, modules already
imported; used while the coordinator has a single thread) or as a fresh interpreter
(``python -m pipefarm.worker --local ...``) otherwise. It gets a pipe for batches and one for
its reports, and publishes the task it is running in a shared slots file
(:class:`~pipefarm.worker.Slots`), so the coordinator enforces timeouts without a message per
task. Workers die with the coordinator (parent-death signal) and each leads its own process
group, so a kill reaches its task's children too. When a worker dies, the end of its stderr (a
fresh interpreter) or its traceback (a forked child) is kept to name the cause.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import msgspec

from ...worker import Slots, local_worker_main, slots_path
from ..transport import Transport

#: How much of a dying worker's stderr (or traceback) is kept to name the cause.
LAST_WORDS_BYTES = 4096

#: How long to wait for a worker whose pipe closed to be reapable (its exit status tells a
#: crash from a kill). The pipe closes in the kernel's exit path just before the process turns
#: into a zombie: microseconds, but a loaded host can delay it by a scheduler tick or two.
WORKER_EXIT_WAIT_S = 1.0

#: How long a worker that was killed or asked to exit is waited for before it is left to the
#: parent-death signal (a worker stuck in uninterruptible sleep must not hang the run).
REAP_WAIT_S = 5.0

_STOP = msgspec.msgpack.encode(None)  # "no more batches: exit"


@dataclass
class _Proc:
    """One worker process as the transport reaches it (the coordinator's ``link``)."""

    pid: int
    conn_out: Connection  # batches to it
    conn_in: Connection  # reports from it
    proc: Any = None  # a Popen when started fresh rather than forked
    err: Any = None  # forked: the read end of the pipe its last words (a traceback) come through
    err_tail: bytearray = field(default_factory=bytearray)  # fresh: the end of its stderr
    err_thread: Any = None  # fresh: the thread that copies its stderr


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


def _sigkill(pid: int) -> None:
    """SIGKILL a worker's process group (its task's children too), or the worker alone."""
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            kill()
            return
        except (ProcessLookupError, PermissionError):
            continue


class ProcessTransport(Transport):
    """Worker processes on this host; ``capture_output`` sends their output to the run's logs."""

    def __init__(self, capture_output: bool = True) -> None:
        self.capture_output = capture_output
        self.host = _host()
        # names this coordinator's slots file and its workers' ids apart from other runs'
        self.tag = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.size = 0  # slots in the slots file
        self.run_dir: str | None = None
        self.slots: Slots | None = None  # what each worker runs now (set by open)
        self.spawned = 0  # workers started so far: each worker id is new

    def open(self, size: int, run_dir: str | None) -> None:
        self.size = size
        self.run_dir = run_dir
        self.slots = Slots(slots_path(self.tag), size, create=True)

    def close(self) -> None:
        if self.slots is None:
            return
        self.slots.close()
        try:
            os.unlink(self.slots.path)
        except OSError:
            pass

    def start(self, slot: int) -> tuple[str, int, _Proc]:
        c2w_r, c2w_w = os.pipe()
        w2c_r, w2c_w = os.pipe()
        self.spawned += 1
        wid = f"{self.host}-{self.tag}-w{slot}.{self.spawned}"
        output = err_log = ""
        if self.capture_output and self.run_dir:
            # the worker appends its stdout/stderr to logs/<wid>.out/.err (Python tasks'
            # output is attributed per attempt from there); a fresh worker's early stderr
            # goes to the .err file too
            output = os.path.join(self.run_dir, "logs")
            os.makedirs(output, mode=0o700, exist_ok=True)
            err_log = os.path.join(output, wid + ".err")
        assert self.slots is not None
        args = (c2w_r, w2c_w, self.slots.path, self.size, slot, self.run_dir or "", wid, output)
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
        link = _Proc(pid, Connection(c2w_w, readable=False), Connection(w2c_r, writable=False),
                     proc, err=err, err_tail=tail, err_thread=drain)
        return wid, pid, link

    def send(self, link: _Proc, message: bytes) -> bool:
        try:
            link.conn_out.send_bytes(message)
        except OSError:  # EPIPE: the worker died
            return False
        return True

    def ready(self, links: Sequence[_Proc], timeout: float) -> list[_Proc]:
        by_conn = {id(p.conn_in): p for p in links}
        try:
            conns = wait([p.conn_in for p in links], timeout=timeout)
        except InterruptedError:
            return []
        return [by_conn[id(c)] for c in conns]

    def receive(self, link: _Proc) -> bytes | None:
        try:
            return link.conn_in.recv_bytes()
        except (EOFError, OSError):
            return None

    def current(self, slot: int) -> tuple[int, float]:
        assert self.slots is not None
        return self.slots.get(slot)

    def clear(self, slot: int) -> None:
        assert self.slots is not None
        self.slots.clear(slot)

    def exit_status(self, link: _Proc) -> int | None:
        # its pipe closes a moment before it can be reaped: wait briefly for the exit status
        return self._reap(link, WORKER_EXIT_WAIT_S)

    def kill(self, links: Sequence[_Proc]) -> None:
        for p in links:  # all at once: they die in parallel, then each is reaped
            _sigkill(p.pid)
        for p in links:
            self._reap(p, REAP_WAIT_S)

    def stop(self, links: Sequence[_Proc]) -> None:
        for p in links:
            self.send(p, _STOP)
        for p in links:
            self._reap(p, REAP_WAIT_S)

    def last_words(self, link: _Proc) -> str:
        data = b""
        if link.err is not None:
            try:
                data = link.err.read() or b""
            except OSError:
                pass
        elif link.err_thread is not None:
            link.err_thread.join(timeout=2.0)  # it is dead: the rest of its stderr is on its way
            data = bytes(link.err_tail)
        self.forget(link)
        lines = data.decode(errors="replace").strip().splitlines()
        return "\n".join(lines[-20:])

    def forget(self, link: _Proc) -> None:
        """Close what is left of a dead worker besides its pipes (closed by :meth:`_reap`)."""
        if link.err is not None:
            try:
                link.err.close()
            except OSError:
                pass
            link.err = None

    @staticmethod
    def _reap(p: _Proc, wait_s: float) -> int | None:
        """Reap ``p`` (waiting up to ``wait_s`` for it to end) and close its pipes; its exit
        status as ``Popen.returncode`` has it (-N: signal N), or None when it has not ended or
        was reaped elsewhere."""
        status: int | None = None
        try:
            if p.proc is not None:
                status = p.proc.wait(timeout=wait_s)
            else:
                end = time.monotonic() + wait_s
                while True:
                    pid, raw = os.waitpid(p.pid, os.WNOHANG)
                    if pid:
                        status = os.waitstatus_to_exitcode(raw)
                        break
                    if time.monotonic() >= end:
                        break
                    time.sleep(0.002)
        except Exception:  # noqa: S110 - reaped elsewhere, or still stuck: the status is unknown
            pass
        for c in (p.conn_out, p.conn_in):
            try:
                c.close()
            except OSError:
                pass
        return status

"""Keeping a worker's command tasks from outliving it: the guardian process.

``PR_SET_PDEATHSIG`` needs a ``preexec_fn``, and a ``preexec_fn`` forces CPython off its
``vfork`` fast path onto a full ``fork`` (posix_spawn is already ruled out by
``start_new_session``): measured on the 2-core development machine it cut spawn throughput of
``true`` from ~1,100/s to ~320/s per worker, and to ~50/s in a worker holding 500 MiB
(``fork`` copies page tables). PDEATHSIG also kills only the direct child, not what it
started, and fires when the spawning *thread* exits. So by default each worker process starts
one tiny *guardian* process that learns every task's process group through a pipe and, when
the worker dies (the pipe reaches EOF), stops those whole groups (SIGTERM, grace, SIGKILL);
its cost does not show in the spawn rate::

    worker process                                   guardian (python -I -S, own session)
    run_command ── start_guardian() ──(spawn once)──> reads "+pgid" / "-pgid" lines
                ── watch_group(pgid)  ── "+pgid" ──>  groups.add(pgid)
                ── forget_group(pgid) ── "-pgid" ──>  groups.discard(pgid)
    (worker dies: the pipe reaches EOF) ───────────>  SIGTERM, grace, SIGKILL to every group left

``PIPEFARM_CHILD_GUARD=pdeathsig`` selects the ``prctl`` way instead (:func:`child_preexec`),
``none`` neither.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

#: Seconds between SIGTERM and SIGKILL when a task's process group is stopped.
KILL_GRACE = 2.0

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


def start_guardian() -> None:
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


def watch_group(pgid: int) -> None:
    """Tell the guardian that process group ``pgid`` belongs to a running task."""
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


def forget_group(pgid: int) -> None:
    """Tell the guardian that task group ``pgid`` is gone (it must not be signalled later)."""
    g = _guard
    if g is None or pgid not in g.live:
        return
    g.live.discard(pgid)
    try:
        g.send(b"-%d\n" % pgid)
    except OSError:
        pass


def _after_fork_in_child() -> None:
    # A forked child (multiprocessing) must not keep the worker's pipe open: the guardian
    # would never see EOF. It gets its own guardian if it ever runs commands.
    global _guard, _guard_lock
    _guard_lock = threading.Lock()
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


def child_preexec() -> Any:
    """The ``preexec_fn`` for a task's Popen: PDEATHSIG in ``pdeathsig`` mode, else None."""
    global _prctl
    if CHILD_GUARD != "pdeathsig" or not sys.platform.startswith("linux"):
        return None
    if _prctl is None:
        import ctypes

        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    return _set_pdeathsig

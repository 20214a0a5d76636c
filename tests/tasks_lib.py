"""Task functions for the failure, run-API and executor tests.

They live in an importable module (``tests/`` is put on ``sys.path`` and ``PYTHONPATH`` by
``conftest.py``) so that workers, forked or started fresh with ``python -m pipefarm.worker``,
resolve them by reference.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def square(x):
    return x * x


def add(a, b=0, *, c=0):
    return a + b + c


def ident(x):
    return x


def sleep_then(x, seconds):
    time.sleep(seconds)
    return x


def sleep_forever(seconds=100.0):
    time.sleep(seconds)
    return "woke up"


class Boom(ValueError):
    """A distinctive exception type (picklable: it lives in an importable module)."""


def explode_with(x):
    raise Boom(f"explode_with got {x}")


def raise_value_error(x):
    raise ValueError(f"bad value {x}")


def append_line(path, text):
    """Append one line to ``path`` with a single O_APPEND write (atomic for short lines)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{text}\n".encode())
    finally:
        os.close(fd)


def mark_and_double(marker_dir, i, seconds=0.0):
    """Append ``i`` to the task's own marker file, optionally sleep, return ``2 * i``."""
    append_line(os.path.join(marker_dir, str(i)), str(i))
    if seconds:
        time.sleep(seconds)
    return 2 * i


def log_start(log_path, label, seconds=0.0):
    """Append ``label`` to a shared log (start order), optionally sleep; return ``label``."""
    append_line(log_path, label)
    if seconds:
        time.sleep(seconds)
    return label


def pid_then_sleep(pid_dir, i, seconds=60.0):
    """First attempt: record this worker's pid in ``pid_dir/i`` and sleep; later ones return."""
    p = Path(pid_dir) / str(i)
    if p.exists():
        return ("second", i)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, p)
    time.sleep(seconds)
    return ("first", i)


def count_then(counter_path, succeed_on, value):
    """Count calls in ``counter_path``; raise until call number ``succeed_on``."""
    append_line(counter_path, "x")
    n = len(Path(counter_path).read_text().splitlines())
    if n < succeed_on:
        raise RuntimeError(f"attempt {n} fails on purpose")
    return value


def fail_first_time(flag_path, value, seconds=0.0):
    """Raise the first time (creating ``flag_path``), succeed afterwards; sleep first."""
    if seconds:
        time.sleep(seconds)
    p = Path(flag_path)
    if not p.exists():
        p.write_text("failed once")
        raise RuntimeError("first call fails on purpose")
    return value


def stuck_in_read(pid_path=None):
    """Block in ``os.read`` on a pipe nobody writes, deaf to SIGALRM, SIGINT and SIGTERM."""
    for sig in (signal.SIGALRM, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if pid_path:
        append_line(pid_path, str(os.getpid()))
    r, _w = os.pipe()
    os.read(r, 1)
    return "read returned"


def stuck_in_sigwait(pid_path=None):
    """Block every catchable signal and wait for SIGUSR2, which nobody sends."""
    if pid_path:
        append_line(pid_path, str(os.getpid()))
    signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP})
    signal.sigwait({signal.SIGUSR2})
    return "sigwait returned"


def big_bytes(i, size, seconds=0.0):
    """``size`` bytes that depend on ``i`` (checked byte for byte by the tests)."""
    if seconds:
        time.sleep(seconds)
    unit = (f"{i:08d}".encode() * (size // 8 + 1))
    return unit[:size]


def getpid(_=None):
    return os.getpid()


# --- helpers for the tests themselves (not tasks) ----------------------------------------------------
def proc_state(pid):
    """The one-letter state of ``pid`` from /proc, or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("State:"):
                    return line.split()[1]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def is_alive(pid):
    """True while ``pid`` exists and is not a zombie (PID 1 here may never reap orphans)."""
    return proc_state(pid) not in (None, "Z", "X")


def _ppid(pid):
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("PPid:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def _pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def descendants(pid):
    """Live processes below ``pid`` (children, grandchildren, ...)."""
    children = {}
    for p in _pids():
        pp = _ppid(p)
        if pp is not None:
            children.setdefault(pp, []).append(p)
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return [p for p in out if is_alive(p)]


#: Root pids of the engines tests share for the whole session (a Ray head, a Dask scheduler and
#: its workers): ray_lib and engines_lib register them, so that tests which kill or count "the
#: workers below this process" leave them alone.
SHARED_ENGINES: set[int] = set()


def own_descendants(pid):
    """:func:`descendants` of ``pid`` outside the shared engines' process trees."""
    engines = set(SHARED_ENGINES)
    for root in SHARED_ENGINES:
        engines.update(descendants(root))
    return [p for p in descendants(pid) if p not in engines]


def live_procs_with_cmdline(fragment):
    """Live processes whose command line contains ``fragment`` (forked workers inherit it)."""
    me = os.getpid()
    found = []
    for p in _pids():
        if p == me:
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in cmd and is_alive(p):
            found.append(p)
    return found


def wait_until(pred, timeout, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# --- for test_local_edges.py ---------------------------------------------------------------------------
def sleep_getpid(seconds=0.0):
    """Sleep ``seconds`` (if any), then return the pid of the process that ran the call."""
    if seconds:
        time.sleep(seconds)
    return os.getpid()


FRESH_ENV = "PIPEFARM_TEST_FRESH_PROCESS"


def rerun_in_fresh_process(request) -> bool:
    """Run the calling test again in a pytest process of its own and assert it passed there;
    True when this call did (the caller returns), False inside that fresh process.

    For tests that measure a worker's own memory: a worker forked from a long test session
    inherits the session's resident pages (engines' clients, imported libraries), so its
    baseline depends on which tests ran before."""
    if os.environ.get(FRESH_ENV) == "1":
        return False
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        request.node.nodeid], cwd=str(request.config.rootpath),
                       env={**os.environ, FRESH_ENV: "1"}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    return True

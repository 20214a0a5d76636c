"""Task functions that end their attempt in unusual ways (for tests/faults/test_task_endings.py).

Importable by workers by reference (``tests/`` is on ``PYTHONPATH``, see ``conftest.py``).
"""

from __future__ import annotations

import ctypes
import os
import sys


def exit_with(code):
    """``sys.exit(code)``: a SystemExit raised by the task."""
    sys.exit(code)


def hard_exit(code):
    """``os._exit(code)``: the task ends its worker process without unwinding."""
    os._exit(code)


def segfault(_x=None):
    """Dereference NULL: the worker process dies of SIGSEGV."""
    ctypes.string_at(0)


def abort(_x=None):
    """abort(): the worker process dies of SIGABRT."""
    os.abort()


def kill_self(sig):
    """Kill this worker process with ``sig`` (stands in for the OOM killer with SIGKILL)."""
    os.kill(os.getpid(), sig)


def signal_state(_x=None):
    """The task process's ignored and blocked signal masks, from /proc."""
    fields = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("SigIgn", "SigBlk"):
                fields[key] = int(value.strip(), 16)
    return fields

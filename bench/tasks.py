"""The task functions the workloads run.

They live in an importable module (not in ``__main__``) so that every system pickles them by
reference: worker processes import ``bench.tasks`` (the suite puts the repository root on
``PYTHONPATH`` for every child and its workers).
"""

from __future__ import annotations

import os
import time


def noop(x):
    """W1/W5: the cheapest possible task."""
    return x


def sleep20(x):
    """W3: 20 ms of (non-CPU) work."""
    time.sleep(0.02)
    return x


def sleep_s(seconds):
    """A task that sleeps for ``seconds``."""
    time.sleep(seconds)
    return seconds


def stamp(path):
    """Start-up: append the wall-clock time at which this task started to ``path``; return it.

    The append is a single ``write`` on an ``O_APPEND`` descriptor, so concurrent tasks never
    interleave their lines.
    """
    now = time.time()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{now!r}\n".encode())
    finally:
        os.close(fd)
    return now


def read_stamps(path):
    """The start times :func:`stamp` wrote to ``path`` (empty if none)."""
    try:
        with open(path) as f:
            return [float(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []

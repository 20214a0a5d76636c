"""How much walltime an array worker has left, so that it starts no task that asked for more
(``time_request``) than it can finish before its walltime warning.

Where the end of the walltime comes from, first found wins:

1. ``pipefarm worker --time T``: ``T`` from the worker's start (minutes, ``HH:MM:SS`` or
   ``D-HH:MM:SS``, as ``pipefarm array --time``);
2. ``SLURM_JOB_END_TIME`` (epoch seconds; set by recent SLURM releases);
3. ``PIPEFARM_WALLTIME_END`` (epoch seconds), which the element scripts ``pipefarm array``
   writes export when given ``--time``: the script's start plus the walltime;
4. inside a SLURM job without either (``srun`` in an allocation): one ``squeue`` query for the
   job's time left, at start.

The warning margin (the warning signal comes that long before the end) is ``--warn-seconds``,
else ``PIPEFARM_WARN_SECONDS`` (written by the same scripts), else 0. Without an end, the
worker has no limit and places every task, as before.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass

END_ENV = "PIPEFARM_WALLTIME_END"
WARN_ENV = "PIPEFARM_WARN_SECONDS"
#: How long the one ``squeue`` query may take at worker start before the worker goes on
#: without a walltime: slurmctld answers in milliseconds unless it is overloaded.
SQUEUE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Walltime:
    """When this worker's walltime ends (epoch seconds on this host's clock; None: no limit
    known), how long before it the warning comes, and where the end was found."""

    end: float | None = None
    margin: float = 0.0
    source: str = ""

    def left(self) -> float | None:
        """Seconds left before the warning (None: no limit); negative once it is past."""
        return None if self.end is None else self.end - time.time() - self.margin

    def describe(self) -> str:
        """One line for the worker's log."""
        if self.end is None:
            return "no walltime known: every task is placed"
        return (f"walltime ends in {self.end - time.time():.0f} s (from {self.source}), warning "
                f"{self.margin:g} s before")


def find_walltime(time_s: float | None = None, warn_s: float | None = None,
                  env: Mapping[str, str] | None = None, *, query: bool = True) -> Walltime:
    """This worker's :class:`Walltime` (see the module docstring for the order); ``query``
    False never asks the scheduler. A malformed variable is ignored (the next source is
    tried), never fatal: a worker without a walltime runs as before."""
    env = os.environ if env is None else env
    margin = warn_s if warn_s is not None else _number(env.get(WARN_ENV)) or 0.0
    if time_s is not None:
        return Walltime(time.time() + time_s, margin, "--time")
    for var in ("SLURM_JOB_END_TIME", END_ENV):
        end = _number(env.get(var))
        if end:
            return Walltime(end, margin, var)
    job = env.get("SLURM_JOB_ID")
    if query and job:
        left = _squeue_time_left(job)
        if left is not None:
            return Walltime(time.time() + left, margin, "squeue")
    return Walltime(None, margin)


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text else None
    except ValueError:
        return None
    return value if value is not None and value >= 0 and value == value else None


def _squeue_time_left(job: str) -> float | None:
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True,
                             text=True, timeout=SQUEUE_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return slurm_duration(out.stdout.strip().splitlines()[0] if out.stdout.strip() else "")


def slurm_duration(text: str) -> float | None:
    """Seconds in a SLURM duration as squeue prints it: ``SS``, ``M:SS``, ``H:MM:SS`` or
    ``D-HH:MM:SS``; None for ``UNLIMITED``, ``NOT_SET``, ``INVALID`` or anything else."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        return None
    days = int(m.group(1) or 0)
    fields = [int(x) for x in m.groups()[1:] if x is not None]
    secs = 0
    for f in fields:
        secs = secs * 60 + f
    if m.group(1) is not None and len(fields) < 3:
        # D-HH, D-HH:MM: with days, the first field is hours
        secs *= 3600 if len(fields) == 1 else 60
    return float(days * 86400 + secs)

"""``pipefarm array RUN --launch mpiexec|srun --backend mpi``: start the mpi backend's job.

Inside an allocation, the launcher starts ``n`` worker ranks plus rank 0 (the coordinator), each
running ``python -m pipefarm run RUN --backend mpi``; this process waits for the job and hands
back its exit status (the ``pipefarm run`` one: 0 all succeeded, 1 some did not, ...).
"""

from __future__ import annotations

import subprocess
import sys

from ..array.launchers import LAUNCHERS
from ..array.spec import abs_path


def launch_command(launcher: str, n: int, run_dir: str, *, python: str | None = None) -> list[str]:
    """argv that runs RUN on the mpi backend with ``n`` worker ranks (``n + 1`` in all)."""
    if n < 1:
        raise ValueError("n must be >= 1")
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; 'srun' or 'mpiexec'")
    return [*LAUNCHERS[launcher](n + 1, None), python or sys.executable, "-m", "pipefarm",
            "run", abs_path(run_dir), "--backend", "mpi", "--no-progress"]


def launch(launcher: str, n: int, run_dir: str, *, python: str | None = None) -> int:
    """Run RUN under ``launcher`` with ``n`` worker ranks; its exit status once it ends.

    Ctrl-C reaches the whole job from the terminal: rank 0 releases the running tasks, and once
    the job has ended the :class:`KeyboardInterrupt` goes on to the caller (the CLI exits 130).
    """
    proc = subprocess.Popen(launch_command(launcher, n, run_dir, python=python))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.wait()
        raise

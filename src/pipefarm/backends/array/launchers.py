"""Workers inside an allocation: the ``srun`` or ``mpiexec`` command that starts them.

The other axis of the array backend: instead of asking a scheduler for a job array
(``registry.py``), ``pipefarm array --launcher`` runs inside an allocation it already holds and
starts one worker per launcher rank, the rank being the worker's element.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable

from .spec import abs_path, signal_name

#: The rank each launcher gives its processes, first match wins.
_RANK = "${SLURM_PROCID:-${PMI_RANK:-${PMIX_RANK:-${OMPI_COMM_WORLD_RANK:-0}}}}"

def _srun(n: int, cpus_per_worker: int | None) -> list[str]:
    # a worker that exits non-zero (a lost lease, a drained element) must not kill the others
    argv = ["srun", f"--ntasks={n}", "--kill-on-bad-exit=0"]
    if cpus_per_worker:
        argv.append(f"--cpus-per-task={cpus_per_worker}")
    return argv


def _mpiexec(n: int, cpus_per_worker: int | None) -> list[str]:
    return ["mpiexec", "-n", str(n)]  # CPUs per rank: the MPI's own flags differ, not passed


#: Each launcher's command before the worker's, from the number of workers and their CPUs.
LAUNCHERS: dict[str, Callable[[int, int | None], list[str]]] = {
    "srun": _srun,
    "mpiexec": _mpiexec,
}


def launch_command(
    launcher: str,
    n: int,
    run_dir: str,
    *,
    python: str | None = None,
    signal: str = "TERM",
    cpus_per_worker: int | None = None,
) -> list[str]:
    """argv that starts ``n`` workers with ``srun`` or ``mpiexec`` inside an allocation.

    Each process runs ``python -m pipefarm worker RUN_DIR --element RANK --signal SIG`` with
    its launcher rank as the element (``SLURM_PROCID``, ``PMI_RANK``, ``PMIX_RANK`` or
    ``OMPI_COMM_WORLD_RANK``), through a tiny ``bash -c`` that ``exec``\\ s the worker so
    signals reach it directly.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    sig = signal_name(signal)
    py = python or sys.executable
    inner = (
        f'PIPEFARM_ELEMENT="{_RANK}"; export PIPEFARM_ELEMENT PIPEFARM_ELEMENTS={n}; '
        f"exec {shlex.quote(py)} -m pipefarm worker {shlex.quote(abs_path(run_dir))} "
        f'--element "$PIPEFARM_ELEMENT" --signal {sig}'
    )
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; 'srun' or 'mpiexec'")
    return [*LAUNCHERS[launcher](n, cpus_per_worker), "bash", "-c", inner, "pipefarm-worker"]

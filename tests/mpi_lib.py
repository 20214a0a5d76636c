"""Helpers for the tests that run pipefarm under a real ``mpiexec`` (Open MPI or MPICH)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import tasks_lib as T
from conftest import service_absent


def require_mpi() -> str:
    """The path of ``mpiexec``; skips (or fails under PIPEFARM_REQUIRE_SERVICES=1) when it or
    mpi4py is missing. mpi4py is looked for in a child process: importing it here would
    initialise MPI in the test process."""
    exe = shutil.which("mpiexec")
    if exe is None:
        service_absent("no mpiexec on PATH (Debian: apt install openmpi-bin)")
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u;"
                            " raise SystemExit(u.find_spec('mpi4py') is None)"])
    if probe.returncode != 0:
        service_absent("mpi4py is not installed (pip install 'pipefarm[mpi]')")
    return exe  # type: ignore[return-value]


def mpi_env() -> dict[str, str]:
    """This environment plus what Open MPI needs here: running as root (CI containers) and
    more ranks than cores (2-core hosts). MPICH ignores these variables."""
    return dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                OMPI_MCA_rmaps_base_oversubscribe="1")


def mpiexec_pipefarm(n: int, *args: str) -> list[str]:
    """``mpiexec -n N python -m pipefarm ARGS...`` with this interpreter."""
    return [require_mpi(), "-n", str(n), sys.executable, "-m", "pipefarm", *args]


def rank_pids(mpiexec_pid: int) -> dict[int, int]:
    """The ranks an ``mpiexec`` started (rank -> pid), from their environment (Open MPI's
    ``OMPI_COMM_WORLD_RANK``, MPICH's ``PMI_RANK``)."""
    ranks = {}
    for pid in T._pids():
        if T._ppid(pid) != mpiexec_pid:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        for kv in env:
            if kv.startswith((b"OMPI_COMM_WORLD_RANK=", b"PMI_RANK=")):
                ranks[int(kv.split(b"=", 1)[1])] = pid
    return ranks

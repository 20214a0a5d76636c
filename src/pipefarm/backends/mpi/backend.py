"""The MPI backend: the shared coordinator on rank 0, one worker slot per other rank.

Start it under ``mpiexec``/``srun``: every rank runs the same command, and the backend sends
ranks 1..N-1 into their worker loop (:func:`~.transport.serve_rank`) when it is made, so they
never lock, open or write the catalog; they exit when rank 0 is done. Callers that open the run
before making the backend (the CLI) call :func:`serve_if_worker_rank` first, so that worker
ranks do not even open the catalog (it may be on another host's disk).

A rank that dies (SIGKILL, node loss) makes most MPI libraries (Open MPI, MPICH) abort the whole
job, rank 0 with it. Nothing recorded is lost then: outcomes commit only on rank 0, the
in-flight leases live in its memory, and the next ``pipefarm run`` (on any backend) reaps the
leases of tasks recorded as running at once.
"""

from __future__ import annotations

import os
from typing import Any

from ...store.base import Store
from ..base import Hooks, Summary
from ..coordinator import Coordinator, HaltPolicy, Tuned

#: Environment variables through which launchers tell a process its rank (Open MPI, PMIx,
#: MPICH/Hydra and Intel MPI, SLURM's srun with PMI): read before mpi4py is imported, so that
#: a process outside any MPI job never initialises MPI.
RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")


def _launched_rank() -> int | None:
    for var in RANK_VARIABLES:
        value = os.environ.get(var)
        if value is not None and value.strip().isdigit():
            return int(value)
    return None


def is_worker_rank() -> bool:
    """Whether this process is an MPI rank other than 0 (read from the launcher's
    environment; mpi4py is not imported)."""
    rank = _launched_rank()
    return rank is not None and rank != 0


def serve_if_worker_rank() -> None:
    """On MPI ranks 1..N-1: serve rank 0's workers until it is done, then exit the process
    (status 0). On rank 0 and outside MPI: return at once.

    Call it first thing where a command may run under ``mpiexec ... --backend mpi``.
    """
    if not is_worker_rank():
        return
    from mpi4py import MPI

    from .transport import serve_rank

    if MPI.COMM_WORLD.Get_rank() == 0:  # the environment lied (a nested launcher)
        return
    serve_rank(MPI.COMM_WORLD)
    raise SystemExit(0)


def release_worker_ranks(comm: Any = None) -> None:
    """On rank 0 of a job whose run never started (refused: locked, held by array workers, not
    a run): tell every worker rank to exit, so the job ends with rank 0's error, not a hang."""
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    from .transport import TAG

    for rank in range(1, comm.Get_size()):
        comm.send(("exit",), dest=rank, tag=TAG)


class MPIBackend(Tuned):
    """Run tasks on the ranks of an MPI job: rank 0 coordinates, each other rank is one worker
    slot (``workers`` caps how many are used; default: all of them).

    Making it on a rank other than 0 serves that rank's workers and exits the process (see
    :func:`serve_if_worker_rank`). ``comm``: the communicator (default ``MPI.COMM_WORLD``).
    ``batch_target_s``, ``max_batch``, ``heartbeat_s``, ``commit_every_s``: see
    :class:`~pipefarm.backends.coordinator.Options`. ``capture_output``: workers' output goes to
    the run's ``logs/`` (which must then be on a filesystem every rank sees). ``gpus_available``:
    the GPU ids handed to tasks by ``CUDA_VISIBLE_DEVICES`` (default: none, since rank 0 cannot
    see the other hosts' devices). ``halt``: a :class:`HaltPolicy` or its text.
    """

    name = "mpi"

    def __init__(
        self,
        workers: int | None = None,
        *,
        comm: Any = None,
        batch_target_s: float = 0.02,
        max_batch: int = 4096,
        heartbeat_s: float = 10.0,
        commit_every_s: float = 0.05,
        capture_output: bool = True,
        gpus_available: list[str] | None = None,
        halt: str | HaltPolicy | None = None,
    ) -> None:
        if comm is None:
            serve_if_worker_rank()
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
        if comm.Get_rank() != 0:
            from .transport import serve_rank

            serve_rank(comm)
            raise SystemExit(0)
        size = comm.Get_size()
        if size < 2:
            raise ValueError("the mpi backend needs at least 2 MPI ranks (rank 0 coordinates,"
                             " the others run tasks): mpiexec -n 3 pipefarm run RUN --backend mpi")
        self.comm = comm
        self.n = min(int(workers), size - 1) if workers else size - 1
        self._keep_tuning(batch_target_s, max_batch, heartbeat_s, commit_every_s, halt)
        self.capture_output = capture_output
        self.gpus_available = [] if gpus_available is None else list(gpus_available)
        self.used = False

    def close(self) -> None:
        """Let the worker ranks go when :meth:`execute` never ran (it tells them itself)."""
        if not self.used:
            self.used = True
            release_worker_ranks(self.comm)

    def execute(self, store: Store, hooks: Hooks | None = None) -> Summary:
        """Run every claimable task of ``store`` on the worker ranks; they are told to exit
        when it returns, so a backend object serves one ``execute``."""
        if self.used:
            raise RuntimeError("an MPIBackend serves one execute: its worker ranks have exited")
        self.used = True
        from .transport import MPITransport

        opts = self._options(self.n, self.gpus_available)
        return Coordinator(opts, MPITransport(self.comm, self.capture_output), store,
                           hooks or Hooks()).run()

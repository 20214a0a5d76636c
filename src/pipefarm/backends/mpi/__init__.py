"""The ``mpi`` backend: ``mpiexec -n N pipefarm run RUN --backend mpi``.

Rank 0 is the coordinator and the catalog's only writer; ranks 1..N-1 are worker slots
(:mod:`.transport`). Importing this package does not import mpi4py (that would initialise MPI):
the backend does, when it is made.
"""

from __future__ import annotations

from .backend import MPIBackend, is_worker_rank, release_worker_ranks, serve_if_worker_rank

__all__ = ["MPIBackend", "is_worker_rank", "release_worker_ranks", "serve_if_worker_rank"]

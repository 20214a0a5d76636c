"""Backends run a store's tasks: ``local`` (a coordinator and worker processes on this host),
``sequential`` (in the calling process), ``array`` (batch jobs on a cluster), ``mpi`` (the ranks
of an MPI job), ``dask`` (a Dask cluster), and any a site
registers in the ``pipefarm.backends`` entry-point group. :mod:`.base` holds the contract.

Nothing here imports a backend until it is asked for (``import pipefarm`` stays fast).
"""

from __future__ import annotations

from typing import Any

from .base import BUILT_IN, Backend, Hooks, Summary, installed, make_backend

#: The built-in backends' names (:func:`installed` adds those registered by other packages).
BACKENDS = tuple(BUILT_IN)

__all__ = ["BACKENDS", "Backend", "Hooks", "Summary", "installed", "make_backend"]


def __getattr__(name: str) -> Any:
    if name in ("Local", "LocalBackend"):
        from .local import LocalBackend

        return LocalBackend
    if name in ("Dask", "DaskBackend"):
        from .dask import DaskBackend

        return DaskBackend
    if name in ("MPI", "MPIBackend"):
        from .mpi import MPIBackend

        return MPIBackend
    if name in ("Ray", "RayBackend"):
        from .ray import RayBackend

        return RayBackend
    if name in ("Sequential", "SequentialBackend"):
        from .sequential import SequentialBackend

        return SequentialBackend
    raise AttributeError(name)

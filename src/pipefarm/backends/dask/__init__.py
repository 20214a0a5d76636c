"""The dask backend: the coordinator on this host, pipefarm worker processes started by
long-running tasks on a Dask cluster (``address=``, ``client=``, or a ``LocalCluster`` started for
the run). ``distributed`` is imported only when a run executes on it.
"""

from __future__ import annotations

from .backend import DaskBackend

__all__ = ["DaskBackend"]

"""The ray backend: the coordinator on this host, pipefarm worker processes started by one Ray
actor per worker slot (``address=`` of a running cluster, or a Ray started for the run). ``ray``
is imported only when a run executes on it.
"""

from __future__ import annotations

from .backend import RayBackend

__all__ = ["RayBackend"]

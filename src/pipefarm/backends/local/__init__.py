"""The local backend: the coordinator with worker processes on this host as its transport.

``backend`` holds :class:`LocalBackend` (its options), ``transport`` the process pool; the
halt policy and how a worker's death is judged belong to the coordinator and are re-exported
here, where callers have always found them.
"""

from __future__ import annotations

from ..coordinator import HALT_PERCENT_MIN_ENDED, HaltPolicy, describe_worker_death
from .backend import MANY_WORKERS_PER_CPU, LocalBackend

__all__ = ["HALT_PERCENT_MIN_ENDED", "MANY_WORKERS_PER_CPU", "HaltPolicy", "LocalBackend",
           "describe_worker_death"]

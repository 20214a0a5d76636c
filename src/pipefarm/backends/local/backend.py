"""The local backend: one coordinator (this process) and N worker processes on this host.

:class:`LocalBackend` holds the options and joins the transport-agnostic
:class:`~pipefarm.backends.coordinator.Coordinator` to the process pool of :mod:`.transport`.
Workers start lazily (at most one per task that could run), die with the coordinator
(parent-death signal), so a killed coordinator leaves no orphans, and the next run reaps their
leases at once.
"""

from __future__ import annotations

import os
import warnings

from ...store.base import Store
from ..base import Hooks, Summary
from ..coordinator import Coordinator, HaltPolicy, Tuned
from .transport import ProcessTransport

#: ``workers`` above this many per CPU gets a warning (it is not a limit: tasks that mostly
#: wait, on I/O or sleeps, can use more workers than CPUs). Measured on the 2-CPU development
#: host: 10,000 workers asked for 2 tasks used to fork 10,000 processes (load average above 300,
#: minutes to stop); 1,000 forked workers take about 1 s to start and 20 s to stop. Below 8 per
#: CPU, starting them costs well under a second and nothing to stop.
MANY_WORKERS_PER_CPU = 8


class LocalBackend(Tuned):
    """Run tasks with ``workers`` processes on this host (default: the CPU count).

    ``batch_target_s``, ``max_batch``, ``heartbeat_s``, ``commit_every_s``: see
    :class:`~pipefarm.backends.coordinator.Options`. ``capture_output``: workers' output goes to
    the run's ``logs/`` (else to this process's stdout/stderr). ``gpus_available``: the GPU ids
    tasks may use (None: those detected). ``halt``: a :class:`HaltPolicy` or its text.
    """

    name = "local"

    def __init__(
        self,
        workers: int | None = None,
        *,
        batch_target_s: float = 0.02,
        max_batch: int = 4096,
        heartbeat_s: float = 10.0,
        commit_every_s: float = 0.05,
        capture_output: bool = True,
        gpus_available: list[str] | None = None,
        halt: str | HaltPolicy | None = None,
    ) -> None:
        self.n = max(1, int(workers or os.cpu_count() or 1))
        self._keep_tuning(batch_target_s, max_batch, heartbeat_s, commit_every_s, halt)
        self.capture_output = capture_output
        self.gpus_available = gpus_available
        cpus = os.cpu_count() or 1
        if self.n > MANY_WORKERS_PER_CPU * cpus:
            warnings.warn(
                f"{self.n:,} workers asked for on a host with {cpus} CPU(s): at most one is"
                " started per task that can run, but beyond a few per CPU they mostly compete"
                " for the CPUs", RuntimeWarning, stacklevel=2,
            )

    def execute(self, store: Store, hooks: Hooks | None = None) -> Summary:
        """Run every claimable task of ``store`` until none is left (see :class:`Hooks` for
        feeding, following and stopping it)."""
        # read at each call: run.execute(halt=...) sets ``halt`` on a backend object it is given
        opts = self._options(self.n, self.gpus_available)
        return Coordinator(opts, ProcessTransport(self.capture_output), store,
                           hooks or Hooks()).run()

"""The dask backend: the coordinator on this host, worker slots as long-running tasks on a Dask
cluster (:mod:`.transport`).

The cluster is the one at ``address`` (``tcp://host:8786``), the one an existing
``distributed.Client`` is connected to (``client=``), or, with neither, a ``LocalCluster``
started for the call and closed after it. The catalog stays on this host: the coordinator is
its only writer, as with every backend but ``array``.
"""

from __future__ import annotations

from typing import Any

from ...store.base import Store
from ..base import Hooks, Summary
from ..coordinator import Coordinator, HaltPolicy, Tuned

#: How long connecting to a cluster at ``address`` may take before the run fails with the
#: client's error (a scheduler on the same network answers in milliseconds).
CONNECT_TIMEOUT_S = 30.0


class DaskBackend(Tuned):
    """Run tasks on a Dask cluster: ``address`` or ``client`` (else a ``LocalCluster`` of
    ``workers`` single-threaded worker processes, started and stopped for the call).

    ``workers``: worker slots at once (default: the cluster's threads). Each slot is one
    pipefarm worker process on a Dask worker's host; its Dask task secedes, so it does not keep
    the worker's thread from other Dask work. ``listen``: the address of this host the Dask
    workers connect back to (default: loopback for a cluster on this host, else the interface
    that routes to the scheduler). The other options are the local backend's (see
    :class:`~pipefarm.backends.coordinator.Options`).
    """

    name = "dask"

    def __init__(
        self,
        workers: int | None = None,
        *,
        address: str | None = None,
        client: Any = None,
        listen: str | None = None,
        batch_target_s: float = 0.02,
        max_batch: int = 4096,
        heartbeat_s: float = 10.0,
        commit_every_s: float = 0.05,
        capture_output: bool = True,
        halt: str | HaltPolicy | None = None,
    ) -> None:
        if address is not None and client is not None:
            raise ValueError("give the dask backend an address or a client, not both")
        self.workers = None if workers is None else max(1, int(workers))
        self.address = address
        self.client = client
        self.listen = listen
        self._keep_tuning(batch_target_s, max_batch, heartbeat_s, commit_every_s, halt)
        self.capture_output = capture_output

    def _connect(self) -> tuple[Any, list[Any]]:
        """The client to use, and what to close after the call (what this call started)."""
        if self.client is not None:
            return self.client, []
        try:
            from distributed import Client, LocalCluster
        except ImportError as exc:
            raise RuntimeError(
                "the dask backend needs dask.distributed: pip install 'pipefarm[dask]'") from exc
        if self.address is not None:
            client = Client(self.address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
            return client, [client]
        import os

        n = self.workers or os.cpu_count() or 1
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster, set_as_default=False)
        return client, [client, cluster]

    def execute(self, store: Store, hooks: Hooks | None = None) -> Summary:
        """Run every claimable task of ``store`` on the cluster until none is left."""
        from .transport import DaskTransport

        client, started = self._connect()
        try:
            n = self.workers or max(1, sum(client.nthreads().values()))
            # GPUs are those of the Dask workers' hosts, not this one's: none are handed out
            opts = self._options(n, [])
            transport = DaskTransport(client, self.capture_output, self.listen)
            return Coordinator(opts, transport, store, hooks or Hooks()).run()
        finally:
            for thing in started:
                try:
                    thing.close()
                except Exception:  # noqa: S110 - closing what we started; the run is done
                    pass

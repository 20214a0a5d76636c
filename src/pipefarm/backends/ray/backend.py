"""The ray backend: the coordinator on this host, worker slots as Ray actors (:mod:`.transport`).

The cluster is the one at ``address`` (any form ``ray.init`` takes: ``auto``, ``HOST:PORT`` of a
running head, ``ray://HOST:PORT`` with ``ray[client]``), the one this process is already
connected to, or, with neither, a Ray started for the call (``ray.init(num_cpus=workers)``) and
shut down after it. The catalog stays on this host: the coordinator is its only writer, as with
every backend but ``array``.
"""

from __future__ import annotations

import os
from typing import Any

from ...store.base import Store
from ..base import Hooks, Summary
from ..coordinator import Coordinator, HaltPolicy, Tuned
from ..remote.transport import advertised_host


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("the ray backend needs ray: pip install 'pipefarm[ray]'") from exc
    return ray


def _needs(store: Store) -> tuple[int, int]:
    """The most CPUs and GPUs one unfinished task of ``store`` needs (at least one CPU)."""
    rows = getattr(store, "pending_spec_resources", lambda: [])()
    cpus = max([1, *(int(r[1]) for r in rows)])
    gpus = max([0, *(int(r[2]) for r in rows)])
    return cpus, gpus


def _check_fits(ray: Any, cpus: float, gpus: float, task_gpus: int) -> None:
    """Refuse, before anything is started, what cannot run: slots the cluster cannot place
    (their actors would wait for resources forever, and so would the run), tasks that need more
    GPUs than a slot holds."""
    if task_gpus > gpus:
        raise RuntimeError(f"a task needs {task_gpus} GPU(s) and each worker slot holds {gpus:g}:"
                           f" give num_gpus={task_gpus} (--num-gpus) or leave it out")
    have = ray.cluster_resources()
    for what, need in (("CPU", cpus), ("GPU", gpus)):
        if need > have.get(what, 0):
            raise RuntimeError(f"each worker slot needs {need:g} {what}(s); the Ray cluster has"
                               f" {have.get(what, 0):g}")


class RayBackend(Tuned):
    """Run tasks on Ray: one actor per worker slot, each starting a pipefarm worker process.

    ``address``: the cluster (see the module docstring; default ``$RAY_ADDRESS``, as Ray's);
    without one, the cluster this process is connected to, else a Ray of ``workers`` CPUs
    started for the call and shut down after it.
    ``workers``: worker slots at once (default: as many as the cluster's CPUs hold).
    ``num_cpus``/``num_gpus``: the Ray resources each slot's actor holds (default: the most any
    unfinished task asks for, at least one CPU). A task that declares ``gpus`` runs on a slot
    holding at least that many and sees all of the slot's GPUs (the ``CUDA_VISIBLE_DEVICES``
    Ray sets for the actor). ``listen``: the address of this host the actors
    connect back to (default: loopback for a Ray on this host, else the interface that routes to
    its head). ``init``: more keyword arguments for ``ray.init``. The other options are the local
    backend's (see :class:`~pipefarm.backends.coordinator.Options`).
    """

    name = "ray"

    def __init__(
        self,
        workers: int | None = None,
        *,
        address: str | None = None,
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        listen: str | None = None,
        init: dict[str, Any] | None = None,
        batch_target_s: float = 0.02,
        max_batch: int = 4096,
        heartbeat_s: float = 10.0,
        commit_every_s: float = 0.05,
        capture_output: bool = True,
        halt: str | HaltPolicy | None = None,
    ) -> None:
        self.workers = None if workers is None else max(1, int(workers))
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.listen = listen
        self.init = dict(init or {})
        self._keep_tuning(batch_target_s, max_batch, heartbeat_s, commit_every_s, halt)
        self.capture_output = capture_output

    def _connect(self, ray: Any) -> bool:
        """Connect this process to the cluster; True when this call did (and must shut down)."""
        if ray.is_initialized() and self.address is None:
            return False
        if ray.is_initialized():
            raise RuntimeError("this process is already connected to a Ray cluster: leave out"
                               " address= to run on it, or ray.shutdown() first")
        kw: dict[str, Any] = {"log_to_driver": False, **self.init}
        if self.address is not None:
            ray.init(address=self.address, **kw)
        else:
            kw.setdefault("include_dashboard", False)
            ray.init(num_cpus=self.workers or os.cpu_count() or 1, **kw)
        return True

    def _listen(self, ray: Any) -> str:
        if self.listen is not None:
            return self.listen
        if self.address is None or self.address == "local":
            return "127.0.0.1"
        try:
            head = ray.get_runtime_context().gcs_address
        except Exception:  # a Ray client connection has no GCS address here
            head = self.address
        return advertised_host("tcp://" + head.split("://", 1)[-1])

    def execute(self, store: Store, hooks: Hooks | None = None) -> Summary:
        """Run every claimable task of ``store`` on the cluster until none is left."""
        from .transport import RayTransport

        ray = _ray()
        started = self._connect(ray)
        try:
            cpus, task_gpus = _needs(store)
            cpus = self.num_cpus if self.num_cpus is not None else cpus
            gpus = self.num_gpus if self.num_gpus is not None else task_gpus
            _check_fits(ray, cpus, gpus, task_gpus)
            n = self.workers or max(1, int(ray.cluster_resources().get("CPU", 1) // max(cpus, 1)))
            # GPUs are those Ray gives each actor (its CUDA_VISIBLE_DEVICES): none handed out
            # here, a slot of `gpus` GPUs runs any task that needs up to that many
            opts = self._options(n, [], slot_gpus=int(gpus))
            transport = RayTransport(ray, self._listen(ray), self.capture_output, cpus, gpus)
            return Coordinator(opts, transport, store, hooks or Hooks()).run()
        finally:
            if started:
                ray.shutdown()

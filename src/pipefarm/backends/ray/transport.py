"""The ray transport: worker slots as Ray actors, one per slot.

Each slot is one actor of :func:`slot_actor_class` whose ``run`` method is
:func:`..remote.slot.slot_task`: it starts the pipefarm worker process on the actor's node,
connected back to the coordinator over TCP; everything else, both ends of the connections
included, is :mod:`..remote`'s. The actor holds the Ray resources a slot's tasks need
(``num_cpus``, ``num_gpus``), so Ray places slots where those are free and a node's GPUs are
visible to the worker process through the ``CUDA_VISIBLE_DEVICES`` Ray sets for the actor.

An actor that dies (its process killed, its node lost) takes its worker (parent-death signal)
and both connections with it: the running task is recorded ``lost`` and runs again on another
slot. Actors are never restarted by Ray (``max_restarts=0``): the coordinator starts the
replacement. Nothing here imports ``ray`` at module level: the backend hands in the module.
"""

from __future__ import annotations

import os
from typing import Any

from ..remote.slot import slot_task
from ..remote.transport import RemoteTransport

_actor_class: Any = None


def slot_actor_class(ray: Any) -> Any:
    """The Ray actor class of a worker slot (made on first use: ``import pipefarm`` must not
    import ray)."""
    global _actor_class
    if _actor_class is None:

        @ray.remote(max_restarts=0, max_task_retries=0)
        class PipefarmSlot:
            """One pipefarm worker slot: :func:`slot_task` in this actor's process."""

            def pid(self) -> int:
                return os.getpid()

            def run(self, *args: Any) -> str:
                return slot_task(*args)

        _actor_class = PipefarmSlot
    return _actor_class


class RayTransport(RemoteTransport):
    """Worker slots as actors on the Ray cluster this process is connected to (``ray.init``
    was called). Each actor holds ``num_cpus`` CPUs and ``num_gpus`` GPUs of Ray's."""

    name = "ray"

    def __init__(self, ray: Any, listen: str, capture_output: bool = True,
                 num_cpus: float = 1, num_gpus: float = 0) -> None:
        super().__init__(listen, capture_output)
        self.ray = ray
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.actors: dict[int, Any] = {}  # by slot: the live actor (for tests and status)

    def _launch(self, slot: int, wid: str, args: tuple) -> Any:
        cls = slot_actor_class(self.ray)
        actor = cls.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                            name=f"pipefarm-slot-{wid}").remote()
        self.actors[slot] = actor
        return actor, actor.run.remote(*args)

    def _ended(self, handle: Any) -> str | None:
        _, ref = handle
        done, _ = self.ray.wait([ref], timeout=0)
        if not done:
            return None
        try:
            return f"its Ray actor ended: {self.ray.get(ref, timeout=0)}"
        except Exception as exc:  # the actor died, or could not start
            return f"{type(exc).__name__}: {exc}"

    def _cancel(self, handle: Any) -> None:
        actor, _ = handle
        for slot, a in list(self.actors.items()):
            if a is actor:
                del self.actors[slot]
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:  # noqa: S110 - already dead, or the driver is disconnecting
            pass

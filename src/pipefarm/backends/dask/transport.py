"""The dask transport: worker slots as long-running tasks on a Dask cluster.

Each worker slot is one Dask task (:func:`dask_slot_task`) that secedes from its Dask worker's
thread pool and runs :func:`..remote.slot.slot_task` there: everything else, both ends of the
connections included, is :mod:`..remote`'s. Nothing here imports ``distributed`` at module
level: the slot task runs on the Dask worker, and the coordinator side gets the client from its
backend.
"""

from __future__ import annotations

from typing import Any

from ..remote.slot import slot_task
from ..remote.transport import RemoteTransport, advertised_host


def dask_slot_task(*args: Any) -> str:
    """:func:`slot_task` as a Dask task: seceded, so a slot holds no thread of the Dask worker's
    pool and other Dask work may run beside it."""
    try:
        from distributed import secede

        secede()
    except (ImportError, ValueError, KeyError):
        pass  # not inside a Dask worker (called directly)
    return slot_task(*args)


class DaskTransport(RemoteTransport):
    """Worker slots as long-running tasks on the cluster of ``client`` (a ``distributed.Client``).

    ``listen``: the address workers connect back to (default: see :func:`advertised_host`).
    """

    name = "dask"

    def __init__(self, client: Any, capture_output: bool = True, listen: str | None = None) -> None:
        super().__init__(listen or advertised_host(client.scheduler.address), capture_output)
        self.client = client

    def _launch(self, slot: int, wid: str, args: tuple) -> Any:
        return self.client.submit(dask_slot_task, *args, key=f"pipefarm-slot-{wid}", pure=False)

    def _ended(self, handle: Any) -> str | None:
        if not handle.done():
            return None
        try:
            exc = handle.exception(timeout=0)
        except Exception as e:  # cancelled
            exc = e
        if exc:
            return f"{type(exc).__name__}: {exc}"
        return f"its Dask task ended: {handle.result(timeout=0)}"

    def _cancel(self, handle: Any) -> None:
        if not handle.done():
            try:
                handle.cancel()  # so that Dask does not run it again elsewhere
            except Exception:  # noqa: S110 - the client is closing: nothing to re-run it
                pass

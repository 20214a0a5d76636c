"""The transport interface: how the coordinator reaches its workers, and nothing else.

The coordinator (:mod:`.coordinator`) decides what each worker runs; a transport only starts
workers, moves the coordinator's messages to them and theirs back, tells which task a worker is
running now, and ends workers. The messages are the worker protocol of :mod:`pipefarm.worker`
(``Batch``/``Revoke`` to a worker, ``Done``/``Revoked`` back, ``None`` for "finish and exit"),
already encoded: a transport moves bytes and never looks inside them.

A worker is known to the coordinator by its *slot* (an index below the transport's size, reused
when a dead worker is replaced) and by the opaque *link* :meth:`Transport.start` returned for it.

The local process pool (:mod:`.local.transport`) is the first transport; an MPI, Dask or Ray one
implements the same methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any


class Transport(ABC):
    """Start, feed, watch and end up to ``size`` workers for one coordinator.

    Every method is called from the coordinator's thread only.
    """

    #: The host workers are registered under in the store.
    host: str

    @abstractmethod
    def open(self, size: int, run_dir: str | None) -> None:
        """Get ready for up to ``size`` workers at once, for the run in ``run_dir``."""

    @abstractmethod
    def close(self) -> None:
        """Release what :meth:`open` took; every worker has been stopped or killed by then."""

    @abstractmethod
    def start(self, slot: int) -> tuple[str, int, Any]:
        """Start a worker in ``slot``: its worker id, its process id, and its link.

        Raises OSError when no more workers can be started (out of processes, descriptors).
        """

    @abstractmethod
    def send(self, link: Any, message: bytes) -> bool:
        """Send one encoded message; False when the worker is gone (it died since we last
        heard of it)."""

    @abstractmethod
    def ready(self, links: Sequence[Any], timeout: float) -> list[Any]:
        """Those of ``links`` with a message (or an end) to receive, waiting up to
        ``timeout`` seconds for one."""

    @abstractmethod
    def receive(self, link: Any) -> bytes | None:
        """The next message from a link :meth:`ready` named; None when the worker is gone."""

    @abstractmethod
    def current(self, slot: int) -> tuple[int, float]:
        """The task the worker in ``slot`` is running and since when (wall-clock time); task 0
        when it runs none. Read without a message: a worker publishes it as it starts a task."""

    @abstractmethod
    def clear(self, slot: int) -> None:
        """Forget the task of ``slot``'s dead worker (its replacement starts idle)."""

    @abstractmethod
    def exit_status(self, link: Any) -> int | None:
        """A worker found gone: its exit status as ``Popen.returncode`` has it (-N: killed by
        signal N), or None when it cannot be known. Waits a little for the status to be
        readable."""

    @abstractmethod
    def kill(self, links: Sequence[Any]) -> None:
        """End these workers now (with whatever task they run) and wait until they are gone."""

    @abstractmethod
    def stop(self, links: Sequence[Any]) -> None:
        """Ask these idle workers to exit and wait until they have."""

    @abstractmethod
    def last_words(self, link: Any) -> str:
        """The end of what a dead worker wrote before dying (stderr, a traceback), to name
        why workers keep dying; empty when nothing was kept."""

    @abstractmethod
    def forget(self, link: Any) -> None:
        """Release what is left of a dead worker (its pipes, files)."""

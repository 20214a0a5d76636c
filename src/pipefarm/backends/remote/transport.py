"""The coordinator's side of remote worker slots, shared by the engines that run pipefarm worker
processes on their own workers: Dask (:mod:`..dask`), Ray (:mod:`..ray`).

Each worker slot is one long-lived unit of work on the engine (a seceded Dask task, a Ray actor's
method) that runs :func:`.slot.slot_task` on the host the engine picked: it starts the very worker
process the local backend starts (``python -m pipefarm.worker --local ...``:
:func:`pipefarm.worker.local_worker_main`) with a TCP connection back to the coordinator instead
of two pipes (the *data* connection: the same framed ``Batch``/``Revoke``/``Done``/``Revoked``
protocol), so nothing of the task pipeline is copied. The slot task keeps a second connection
(the *control* one) for what the local transport reads from its shared slots file and from
``waitpid``, since hosts differ:

    coordinator (this process)                 engine worker (any host)
    RemoteTransport - listener (random token) <-- slot_task: control conn
      ready(): control frames update            |   polls the worker's one-cell Slots file:
      current(slot) and exit status             |   ("run", task, since) when it changes;
                                                |   kills the process group on ("kill",);
                                                |   ("exit", status, task, since, stderr) at end
      send/receive: data conn <------------------- python -m pipefarm.worker --local FD FD ...

The coordinator (:mod:`..coordinator`) is unchanged: timeouts, lost workers and replacements
work as with local processes. An engine worker that dies (a Dask worker, a Ray actor) takes its
slot task, hence its pipefarm worker (parent-death signal), with it: both connections drop,
``receive`` answers None, the running task is recorded ``lost`` and runs again; the replacement
is a new unit of work. One that the engine itself re-runs after such a death presents a
forgotten nonce and is turned away.

An engine's flavour subclasses :class:`RemoteTransport` with three hooks: :meth:`~RemoteTransport.
_launch` (start a slot task, return its handle), :meth:`~RemoteTransport._ended` (how a slot task
that never connected ended, or None while it runs) and :meth:`~RemoteTransport._cancel`.
"""

from __future__ import annotations

import hmac
import os
import secrets
import socket
import sys
import time
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import msgspec

from ..transport import Transport
from .slot import nodelay

#: How long a worker found gone is waited for its exit status (its slot task reaps it and sends
#: it at once; an engine worker that died takes the control connection with it: no status).
EXIT_WAIT_S = 1.0

#: How long workers that were killed or asked to exit are waited for before they are left to
#: their slot tasks (which end them when the coordinator's connections close).
REAP_WAIT_S = 5.0

#: How long a new connection has to present its token (a slot task sends it as it connects).
HELLO_WAIT_S = 2.0

#: How often slot tasks that never connected are asked whether they ended (a call into the
#: engine's client each: 10 per second is nothing beside the run's own traffic).
ENDED_CHECK_S = 0.1

_STOP = msgspec.msgpack.encode(None)
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


@dataclass(eq=False)
class _Link:
    """One worker slot as the coordinator reaches it."""

    slot: int
    nonce: str
    handle: Any = None  # the slot task as its engine knows it (from _launch)
    data: Connection | None = None
    ctl: Connection | None = None
    outbox: list[bytes] = field(default_factory=list)  # sent before the worker connected
    exited: bool = False  # its exit message came (or its control connection closed)
    status: int | None = None
    words: str = ""
    gone: bool = False  # its data connection closed, or it never connected and never will


def advertised_host(scheduler_address: str) -> str:
    """The address of this host that the cluster's workers can reach: loopback for a cluster on
    this host, else the interface that routes to the scheduler."""
    hostport = scheduler_address.split("://", 1)[-1]
    host = hostport.rsplit(":", 1)[0].strip("[]") if ":" in hostport else hostport
    if scheduler_address.startswith("inproc") or host in ("127.0.0.1", "localhost", "::1", ""):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))  # no packet is sent: only the route is looked up
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


class RemoteTransport(Transport):
    """Worker slots as slot tasks that an engine runs (see the module docstring).

    ``listen``: the address of this host the engine's workers connect back to (see
    :func:`advertised_host`). Subclasses set :attr:`name` (the store's host and the workers' id
    prefix) and implement the three engine hooks.
    """

    #: The engine's name: the host workers are registered under, their ids' prefix.
    name = "remote"

    def __init__(self, listen: str, capture_output: bool = True) -> None:
        self.capture_output = capture_output
        self.listen = listen
        self.host = self.name
        self.tag = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.token = secrets.token_hex(16)
        self.links: dict[str, _Link] = {}  # by nonce: the slot tasks that may still connect
        self.cur: dict[int, tuple[int, float]] = {}
        self.spawned = 0
        self.run_dir: str | None = None
        self.server: socket.socket | None = None
        self.port = 0
        self._last_ended_check = 0.0

    # --- the engine's hooks ---
    @abstractmethod
    def _launch(self, slot: int, wid: str, args: tuple) -> Any:
        """Start ``slot_task(*args)`` on the engine for worker ``wid``; its handle. Raises when
        the engine cannot take it (any exception: :meth:`start` makes it an OSError)."""

    @abstractmethod
    def _ended(self, handle: Any) -> str | None:
        """How the slot task ``handle`` ended (its error, or what it returned), or None while it
        has not."""

    @abstractmethod
    def _cancel(self, handle: Any) -> None:
        """End the slot task ``handle`` if it still runs, so that the engine does not run it
        again elsewhere (the client may be closing: fail quietly)."""

    # --- the transport ---
    def open(self, size: int, run_dir: str | None) -> None:
        self.run_dir = run_dir
        self.server = socket.create_server((self.listen, 0), backlog=max(128, 2 * size))
        self.port = self.server.getsockname()[1]

    def close(self) -> None:
        for link in list(self.links.values()):
            self.forget(link)
        if self.server is not None:
            self.server.close()
            self.server = None

    def start(self, slot: int) -> tuple[str, int, _Link]:
        self.spawned += 1
        wid = f"{self.name}-{self.tag}-w{slot}.{self.spawned}"
        link = _Link(slot, secrets.token_hex(8))
        self.links[link.nonce] = link
        self.cur[slot] = (0, 0.0)
        paths = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
        args = (self.listen, self.port, self.token, link.nonce, self.run_dir or "", wid,
                self.capture_output, paths)
        try:
            link.handle = self._launch(slot, wid, args)
        except Exception as exc:  # the cluster is gone: like being out of processes
            del self.links[link.nonce]
            raise OSError(f"cannot start a worker slot on {self.name}: {exc}") from exc
        return wid, 0, link

    # --- connections ---
    def _accept(self) -> None:
        assert self.server is not None
        try:
            sock, _ = self.server.accept()
        except OSError:
            return
        try:
            nodelay(sock)
            sock.setblocking(True)  # Connection reads whole frames: a non-blocking fd breaks them
            conn = Connection(sock.detach())
            if not conn.poll(HELLO_WAIT_S):
                raise OSError("no hello")
            token, nonce, role = _dec.decode(conn.recv_bytes(maxlength=256))
            link = self.links.get(str(nonce))
            if (not hmac.compare_digest(str(token), self.token) or link is None or link.gone
                    or (role == "ctl" and link.ctl is not None)
                    or (role == "data" and (link.data is not None or link.ctl is None))):
                conn.send_bytes(_enc.encode("no"))
                conn.close()
                return
            conn.send_bytes(_enc.encode("ok"))
        except (OSError, EOFError, ValueError, TypeError, msgspec.DecodeError):
            try:
                sock.close()
            except OSError:
                pass
            return
        if role == "ctl":
            link.ctl = conn
            return
        link.data = conn
        for message in link.outbox:
            self.send(link, message)
        link.outbox.clear()

    def _on_control(self, link: _Link) -> None:
        """Read what ``link``'s slot task said (``run``/``exit``), or note that it is gone."""
        assert link.ctl is not None
        try:
            while link.ctl.poll(0):
                msg = _dec.decode(link.ctl.recv_bytes())
                if msg[0] == "run":
                    self.cur[link.slot] = (int(msg[1]), float(msg[2]))
                elif msg[0] == "exit":
                    link.status, link.words = msg[1], msg[4]
                    self.cur[link.slot] = (int(msg[2]), float(msg[3]))
                    link.exited = True
        except (EOFError, OSError, msgspec.DecodeError):
            link.exited = True
        if link.exited:
            link.ctl.close()
            link.ctl = None

    def _unborn_dead(self) -> list[_Link]:
        """Links whose slot task ended (failed, cancelled) before their worker connected."""
        now = time.monotonic()
        if now - self._last_ended_check < ENDED_CHECK_S:
            return []
        self._last_ended_check = now
        dead = []
        for link in self.links.values():
            if link.data is None and not link.gone and link.handle is not None:
                how = self._ended(link.handle)
                if how is not None:
                    link.gone = True
                    link.words = link.words or how
                    dead.append(link)
        return dead

    def _pump(self, want: Sequence[_Link], timeout: float) -> list[_Link]:
        """Serve the listener and control connections until one of ``want`` has data (or an
        end) to receive, or ``timeout`` passed; those of ``want`` that do."""
        deadline = time.monotonic() + timeout
        by_data = {id(lk.data): lk for lk in want if lk.data is not None}
        while True:
            found = [lk for lk in self._unborn_dead() if any(lk is w for w in want)]
            if found:
                return found
            ctls = {id(lk.ctl): lk for lk in self.links.values() if lk.ctl is not None}
            objs: list[Any] = [lk.data for lk in want if lk.data is not None]
            objs += [lk.ctl for lk in ctls.values()]
            if self.server is not None:
                objs.append(self.server)
            left = max(0.0, deadline - time.monotonic())
            try:
                hits = wait(objs, timeout=min(left, 0.1))
            except InterruptedError:
                return []
            out = []
            for h in hits:
                if h is self.server:
                    self._accept()
                    by_data = {id(lk.data): lk for lk in want if lk.data is not None}
                elif id(h) in ctls:
                    self._on_control(ctls[id(h)])
                elif id(h) in by_data:
                    out.append(by_data[id(h)])
            if out or time.monotonic() >= deadline:
                return out

    def send(self, link: _Link, message: bytes) -> bool:
        if link.gone:
            return False
        if link.data is None:
            link.outbox.append(message)
            return True
        try:
            link.data.send_bytes(message)
        except OSError:
            return False
        return True

    def ready(self, links: Sequence[_Link], timeout: float) -> list[_Link]:
        return self._pump(links, timeout)

    def receive(self, link: _Link) -> bytes | None:
        if link.data is None:
            return None
        try:
            return link.data.recv_bytes()
        except (EOFError, OSError):
            link.gone = True
            return None

    def current(self, slot: int) -> tuple[int, float]:
        return self.cur.get(slot, (0, 0.0))

    def clear(self, slot: int) -> None:
        self.cur[slot] = (0, 0.0)

    def _await_exit(self, links: Sequence[_Link], wait_s: float) -> None:
        end = time.monotonic() + wait_s
        while time.monotonic() < end:
            waiting = [lk for lk in links if lk.ctl is not None and not lk.exited]
            if not waiting:
                return
            hits = wait([lk.ctl for lk in waiting], timeout=max(0.0, end - time.monotonic()))
            for lk in waiting:
                if lk.ctl in hits:
                    self._on_control(lk)

    def exit_status(self, link: _Link) -> int | None:
        self._await_exit([link], EXIT_WAIT_S)
        return link.status

    def kill(self, links: Sequence[_Link]) -> None:
        for lk in links:
            if lk.ctl is not None:
                try:
                    lk.ctl.send_bytes(_enc.encode(["kill"]))
                except OSError:
                    pass
        self._await_exit(links, REAP_WAIT_S)
        for lk in links:
            self._drop(lk)

    def stop(self, links: Sequence[_Link]) -> None:
        for lk in links:
            if lk.data is not None:
                self.send(lk, _STOP)
            else:  # never connected: it has nothing to finish
                self._drop(lk)
        self._await_exit(links, REAP_WAIT_S)
        for lk in links:
            self._drop(lk)

    def _drop(self, link: _Link) -> None:
        """Close ``link``'s connections; its slot task ends its worker when they close, and a
        late connection of it (the engine re-running its slot task) is turned away."""
        link.gone = True
        for conn in (link.data, link.ctl):
            if conn is not None:
                try:
                    conn.close()
                except OSError:
                    pass
        link.data = link.ctl = None

    def last_words(self, link: _Link) -> str:
        lines = link.words.strip().splitlines()
        self.forget(link)
        return "\n".join(lines[-20:])

    def forget(self, link: _Link) -> None:
        self._drop(link)
        self.links.pop(link.nonce, None)
        if link.handle is not None:
            handle, link.handle = link.handle, None
            self._cancel(handle)

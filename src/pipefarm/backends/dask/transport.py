"""The dask transport: pipefarm worker processes started by long-running tasks on a Dask cluster.

Each worker slot is one Dask task (:func:`slot_task`) that secedes from its Dask worker's thread
pool and, on that worker's host, starts the very worker process the local backend starts
(``python -m pipefarm.worker --local ...``: :func:`pipefarm.worker.local_worker_main`). Instead
of two pipes, it gets a TCP connection back to the coordinator (the *data* connection: the same
framed ``Batch``/``Revoke``/``Done``/``Revoked`` protocol), so nothing of the task pipeline is
copied. The slot task keeps a second connection (the *control* one) for what the local
transport reads from its shared slots file and from ``waitpid``, since hosts differ:

    coordinator (this process)                 Dask worker (any host)
    DaskTransport -- listener (random token) <-- slot_task: control conn
      ready(): control frames update            |   polls the worker's one-cell Slots file:
      current(slot) and exit status             |   ("run", task, since) when it changes;
                                                |   kills the process group on ("kill",);
                                                |   ("exit", status, task, since, stderr) at end
      send/receive: data conn <------------------- python -m pipefarm.worker --local FD FD ...

The coordinator (:mod:`..coordinator`) is unchanged: timeouts, lost workers and replacements
work as with local processes. A Dask worker that dies takes its slot task's thread, hence its
pipefarm worker (parent-death signal), with it: both connections drop, ``receive`` answers None,
the running task is recorded ``lost`` and runs again; the replacement slot task is a new Dask
task. A slot task that Dask itself re-runs after such a death presents a forgotten nonce and is
turned away.

Nothing here imports ``distributed`` at module level: :func:`slot_task` runs on the Dask worker,
and the coordinator side gets the client from its backend.
"""

from __future__ import annotations

import hmac
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import msgspec

from ..transport import Transport

#: How often a slot task looks at which task its worker runs (and reports a change): the
#: precision of Python tasks' timeouts and of the "running" column. 10 ms costs one read of a
#: shared-memory cell per tick, and at most 100 small messages per second per worker.
ANNOUNCE_S = 0.01

#: How long a worker found gone is waited for its exit status (its slot task reaps it and sends
#: it at once; a Dask worker that died takes the control connection with it: no status).
EXIT_WAIT_S = 1.0

#: How long workers that were killed or asked to exit are waited for before they are left to
#: their slot tasks (which end them when the coordinator's connections close).
REAP_WAIT_S = 5.0

#: How long a new connection has to present its token (a slot task sends it as it connects).
HELLO_WAIT_S = 2.0

#: How much of a dying worker's stderr is kept to name the cause (as the local transport).
LAST_WORDS_BYTES = 4096

_STOP = msgspec.msgpack.encode(None)
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


def _nodelay(sock: socket.socket) -> None:
    # small frames both ways (a batch, its report): Nagle's algorithm would hold each one back
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# --- the Dask worker's side -----------------------------------------------------------------------
def _connect(host: str, port: int, token: str, nonce: str, role: str) -> Connection | None:
    """A connection to the coordinator that presented ``token``; None when it was turned away."""
    sock = socket.create_connection((host, port), timeout=30)
    _nodelay(sock)
    sock.settimeout(None)
    conn = Connection(sock.detach())
    conn.send_bytes(_enc.encode([token, nonce, role]))
    try:
        ok = conn.poll(30) and _dec.decode(conn.recv_bytes()) == "ok"
    except (EOFError, OSError):
        ok = False
    if not ok:
        conn.close()
        return None
    return conn


def _worker_env(paths: list[str]) -> dict[str, str]:
    """This environment with the coordinator's import path (the entries that exist here) first
    on ``PYTHONPATH``, so the worker finds the tasks' modules where the coordinator found them."""
    env = dict(os.environ)
    extra = [p for p in paths if p and os.path.isdir(p)]
    if env.get("PYTHONPATH"):
        extra += env["PYTHONPATH"].split(os.pathsep)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(extra))
    return env


def slot_task(host: str, port: int, token: str, nonce: str, run_dir: str, wid: str,
              capture_output: bool, paths: list[str]) -> str:
    """One worker slot, run as a long-running Dask task: start a pipefarm worker process here,
    connected to the coordinator, relay which task it runs, and kill it when told to."""
    from ...backends.local.transport import _copy_stderr, _sigkill
    from ...worker import Slots, slots_path

    try:
        from distributed import secede

        secede()  # a slot holds no thread of the Dask worker's pool: others may run beside it
    except (ImportError, ValueError, KeyError):
        pass  # not inside a Dask worker (called directly)
    ctl = _connect(host, port, token, nonce, "ctl")
    if ctl is None:
        return "turned away"
    data = _connect(host, port, token, nonce, "data")
    if data is None:
        ctl.close()
        return "turned away"
    slots = Slots(slots_path(f"dask-{os.getpid()}-{nonce}"), 1, create=True)
    output = err_log = ""
    if run_dir and os.path.isdir(run_dir) and capture_output:
        output = os.path.join(run_dir, "logs")
        os.makedirs(output, mode=0o700, exist_ok=True)
        err_log = os.path.join(output, wid + ".err")
    elif run_dir and not os.path.isdir(run_dir):
        run_dir = ""  # not shared with this host: commands' output is not kept
    fd = data.fileno()
    fd2 = os.dup(fd)
    tail = bytearray()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipefarm.worker", "--local", str(fd), str(fd2), slots.path,
             "1", "0", run_dir, wid, output],
            pass_fds=(fd, fd2), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=_worker_env(paths), start_new_session=True,
        )
    except OSError as exc:
        ctl.send_bytes(_enc.encode(["exit", 127, 0, 0.0, f"cannot start a worker: {exc}"]))
        raise
    finally:
        os.close(fd2)
        data.close()  # the worker holds it now
    drain = threading.Thread(target=_copy_stderr, args=(proc.stderr, tail, err_log),
                             name="pipefarm-worker-stderr", daemon=True)
    drain.start()
    announced = (0, 0.0)
    try:
        while proc.poll() is None:
            try:
                if ctl.poll(ANNOUNCE_S):
                    msg = _dec.decode(ctl.recv_bytes())
                    if msg == ["kill"]:
                        _sigkill(proc.pid)
            except (EOFError, OSError):  # the coordinator is gone: so is this worker
                _sigkill(proc.pid)
                proc.wait()
                return "coordinator gone"
            cur = slots.get(0)
            if cur != announced and proc.poll() is None:
                ctl.send_bytes(_enc.encode(["run", cur[0], cur[1]]))
                announced = cur
        status = proc.wait()
        drain.join(timeout=2.0)
        task, since = slots.get(0)  # the task it was running as it died (0: none)
        words = bytes(tail).decode(errors="replace")
        try:
            ctl.send_bytes(_enc.encode(["exit", status, task, since, words]))
        except OSError:
            pass
        return f"exit {status}"
    finally:
        if proc.poll() is None:
            _sigkill(proc.pid)
            proc.wait()
        ctl.close()
        slots.close()
        try:
            os.unlink(slots.path)
        except OSError:
            pass


# --- the coordinator's side -----------------------------------------------------------------------
@dataclass(eq=False)
class _Link:
    """One worker slot as the coordinator reaches it."""

    slot: int
    nonce: str
    future: Any = None  # the slot task's Dask future
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


class DaskTransport(Transport):
    """Worker slots as long-running tasks on the cluster of ``client`` (a ``distributed.Client``).

    ``listen``: the address workers connect back to (default: see :func:`advertised_host`).
    """

    def __init__(self, client: Any, capture_output: bool = True, listen: str | None = None) -> None:
        self.client = client
        self.capture_output = capture_output
        self.listen = listen or advertised_host(client.scheduler.address)
        self.host = "dask"
        self.tag = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.token = secrets.token_hex(16)
        self.links: dict[str, _Link] = {}  # by nonce: the slot tasks that may still connect
        self.cur: dict[int, tuple[int, float]] = {}
        self.spawned = 0
        self.run_dir: str | None = None
        self.server: socket.socket | None = None
        self.port = 0
        self._last_futures_check = 0.0

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
        wid = f"dask-{self.tag}-w{slot}.{self.spawned}"
        link = _Link(slot, secrets.token_hex(8))
        self.links[link.nonce] = link
        self.cur[slot] = (0, 0.0)
        paths = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
        try:
            link.future = self.client.submit(
                slot_task, self.listen, self.port, self.token, link.nonce, self.run_dir or "",
                wid, self.capture_output, paths, key=f"pipefarm-slot-{wid}", pure=False,
            )
        except Exception as exc:  # the cluster is gone: like being out of processes
            del self.links[link.nonce]
            raise OSError(f"cannot submit a worker slot to Dask: {exc}") from exc
        return wid, 0, link

    # --- connections ---
    def _accept(self) -> None:
        assert self.server is not None
        try:
            sock, _ = self.server.accept()
        except OSError:
            return
        try:
            _nodelay(sock)
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
        if now - self._last_futures_check < 0.1:
            return []
        self._last_futures_check = now
        dead = []
        for link in self.links.values():
            if link.data is None and not link.gone and link.future is not None and link.future.done():
                link.gone = True
                try:
                    exc = link.future.exception(timeout=0)
                except Exception as e:  # cancelled
                    exc = e
                link.words = link.words or (f"{type(exc).__name__}: {exc}" if exc else
                                            f"its Dask task ended: {link.future.result(timeout=0)}")
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
        late connection of it (Dask re-running the task) is turned away."""
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
        if link.future is not None:
            fut, link.future = link.future, None
            if not fut.done():
                try:
                    fut.cancel()  # so that Dask does not run it again elsewhere
                except Exception:  # noqa: S110 - the client is closing: nothing to re-run it
                    pass

"""The engine's side of a remote worker slot: :func:`slot_task`, run by an engine's long-lived
unit of work (a seceded Dask task, a Ray actor's method) on whatever host the engine picked.

It starts the very worker process the local backend starts (``python -m pipefarm.worker
--local ...``), handing it a TCP connection back to the coordinator instead of two pipes, and
keeps a second connection of its own to relay what the local transport reads from its slots
file and from ``waitpid``. Nothing here imports an engine: :mod:`.transport` is the other end.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection

import msgspec

#: How often a slot task looks at which task its worker runs (and reports a change): the
#: precision of Python tasks' timeouts and of the "running" column. 10 ms costs one read of a
#: shared-memory cell per tick, and at most 100 small messages per second per worker.
ANNOUNCE_S = 0.01

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


def nodelay(sock: socket.socket) -> None:
    """Send small frames at once (a batch, its report): Nagle's algorithm would hold each back."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _connect(host: str, port: int, token: str, nonce: str, role: str) -> Connection | None:
    """A connection to the coordinator that presented ``token``; None when it was turned away."""
    sock = socket.create_connection((host, port), timeout=30)
    nodelay(sock)
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
    """One worker slot: start a pipefarm worker process here, connected to the coordinator at
    ``host:port``, relay which task it runs, and kill it when told to. Returns how it ended."""
    from ...backends.local.transport import _copy_stderr, _sigkill
    from ...worker import Slots, slots_path

    ctl = _connect(host, port, token, nonce, "ctl")
    if ctl is None:
        return "turned away"
    data = _connect(host, port, token, nonce, "data")
    if data is None:
        ctl.close()
        return "turned away"
    slots = Slots(slots_path(f"remote-{os.getpid()}-{nonce}"), 1, create=True)
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

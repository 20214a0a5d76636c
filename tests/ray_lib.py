"""One real Ray head for a whole pytest session, as a separate process tree.

API (stable: other test modules import it):

- ``ray_address`` -- a session-scoped pytest fixture: the ``HOST:PORT`` of the shared head
  (what ``ray.init(address=...)`` and ``backend="ray", address=...`` take). Skips (fails under
  ``PIPEFARM_REQUIRE_SERVICES=1``) when ray is not installed.
- :func:`shared_ray_address` -- the same as a plain function, for code that is not a fixture.
- :func:`start_ray_head` -- a head of one's own (:class:`RayHead`, with ``stop()``).

The head is ``ray start --head --block`` with every port it opens chosen free and its own temp
dir, so concurrent sessions on one host (a developer's, a clean-clone CI) never meet; it is
stopped by killing its process group (``ray stop`` would stop every Ray on the host). Import it
as ``tests.ray_lib`` or ``ray_lib``: both names are one module, hence one head.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import tasks_lib

sys.modules.setdefault("ray_lib", sys.modules[__name__])
sys.modules.setdefault("tests.ray_lib", sys.modules[__name__])

from conftest import service_absent  # noqa: E402 - after the aliases, so one module serves both

#: The head's CPUs: the CI host's cores. Tests' actors hold one each.
HEAD_CPUS = 2

#: How long ``ray start --head`` may take to answer on its port (about 5 s on 2 cores; CI
#: loaded with other tests has seen 3x that).
START_TIMEOUT_S = 60.0

#: How long a SIGTERMed head may drain before its process group is SIGKILLed (it offers to
#: drain for 30 s; nothing in a test session needs draining).
STOP_GRACE_S = 2.0

# Ray's state API and ``ray.init`` against a head need this since 2.60 (no cluster token here)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def require_ray() -> None:
    """Skip (or fail under PIPEFARM_REQUIRE_SERVICES=1) when ray is not installed."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        service_absent("ray is not installed (pip install 'pipefarm[ray]')")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ray_exe() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "ray")
    return exe if os.path.exists(exe) else (shutil.which("ray") or "ray")


class RayHead:
    """A ``ray start --head --block`` process group of our own; :meth:`stop` ends it."""

    def __init__(self, num_cpus: int = HEAD_CPUS) -> None:
        require_ray()
        port, dash, agent, agent_grpc, metrics = _free_ports(5)
        self.tmp = tempfile.mkdtemp(prefix="pf-ray-")
        self.address = f"127.0.0.1:{port}"
        env = dict(os.environ, RAY_AUTH_MODE="disabled")
        # the tests' modules (tasks_lib) must import in Ray's worker processes too
        self.log = open(os.path.join(self.tmp, "head.log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [_ray_exe(), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
             "--port", str(port), "--dashboard-port", str(dash),
             "--dashboard-agent-listen-port", str(agent),
             "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port",
             str(metrics), "--num-cpus", str(num_cpus), "--num-gpus", "0",
             "--disable-usage-stats", "--temp-dir", os.path.join(self.tmp, "t")],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )
        tasks_lib.SHARED_ENGINES.add(self.proc.pid)
        try:
            self._wait_up()
        except BaseException:
            self.stop()
            raise

    def _wait_up(self) -> None:
        end = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start --head exited {self.proc.returncode}:\n"
                                   + self.tail())
            with open(self.log.name, "rb") as f:
                if b"Ray runtime started" in f.read():
                    return
            time.sleep(0.2)
        raise RuntimeError("ray start --head did not come up in time:\n" + self.tail())

    def tail(self) -> str:
        with open(self.log.name, "rb") as f:
            return f.read()[-3000:].decode(errors="replace")

    def stop(self) -> None:
        """End the head and every process it started (its process group), then its files."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(STOP_GRACE_S)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def start_ray_head(num_cpus: int = HEAD_CPUS) -> RayHead:
    """A new head of one's own (stop it with ``.stop()``)."""
    return RayHead(num_cpus)


_shared: RayHead | None = None


def shared_ray_address() -> str:
    """The address of this process's one shared head, started on first use and stopped at exit."""
    global _shared
    require_ray()
    if _shared is None:
        _shared = RayHead()
        atexit.register(_shared.stop)
    return _shared.address


@pytest.fixture(scope="session")
def ray_address() -> str:
    """``HOST:PORT`` of the session's shared Ray head (see :func:`shared_ray_address`)."""
    return shared_ray_address()

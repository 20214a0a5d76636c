"""One place that knows how to run a run directory on every backend (the cross-backend tests).

- :data:`ENGINES` -- the backends the failure matrix runs on.
- :func:`require` -- skip (or fail under ``PIPEFARM_REQUIRE_SERVICES=1``) when an engine is
  missing here; answers the address to reach it (dask, ray) or None.
- :func:`run_argv` / :func:`start` / :func:`execute_on` -- ``pipefarm run RUN --backend E`` as
  a process (``mpiexec -n W+1 ...`` for mpi), so that a test can kill or interrupt it.
- :func:`shared_dask_address` -- one external Dask cluster for the whole session
  (``dask scheduler`` + one ``dask worker --nworkers 2 --nthreads 1``), stopped at exit;
  :func:`shared_ray_address` (``ray_lib``) is the Ray head's.

Every run goes through the CLI in its own process: the pytest process then starts no engine
client (a Dask client's threads would make local runs here start fresh interpreters instead
of forking), and a kill reaches exactly the run. The task functions below live here so that
workers on every engine import them by reference (``tests/`` is on ``PYTHONPATH``).
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import tasks_lib as T
from conftest import service_absent
from mpi_lib import rank_pids as mpi_rank_pids  # noqa: F401 - the matrix's name for it

#: The backends of the failure matrix (``array`` has its own tests: no coordinator).
ENGINES = ["local", "sequential", "mpi", "dask", "ray"]

#: How long one ``pipefarm run`` of a matrix row may take before the test fails (no hang).
RUN_TIMEOUT_S = 90.0

#: How long the shared Dask cluster may take to come up (about 3 s on the 2-core CI host).
DASK_START_TIMEOUT_S = 60.0


# --- the engines ------------------------------------------------------------------------------
def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def require(engine: str) -> str | None:
    """Skip when ``engine`` cannot run here; the address to reach it (dask, ray) or None."""
    if engine in ("local", "sequential"):
        return None
    if engine == "mpi":
        from mpi_lib import require_mpi

        require_mpi()
        return None
    if engine == "dask":
        if not _importable("distributed"):
            service_absent("dask.distributed is not installed (pip install 'pipefarm[dask]')")
        return shared_dask_address()
    if engine == "ray":
        from ray_lib import shared_ray_address

        import pipefarm.backends as pb

        if "ray" not in pb.installed():
            service_absent("the ray backend is not part of this pipefarm yet")
        return shared_ray_address()
    raise ValueError(f"unknown engine {engine!r}")


def engine_env(engine: str) -> dict[str, str]:
    """The environment ``pipefarm run`` gets (Open MPI's root/oversubscribe switches for mpi)."""
    if engine == "mpi":
        from mpi_lib import mpi_env

        return mpi_env()
    env = dict(os.environ)
    if engine == "ray":
        env.setdefault("RAY_AUTH_MODE", "disabled")
    return env


def run_argv(engine: str, run_dir: str | os.PathLike[str], workers: int = 2,
             address: str | None = None, *extra: str) -> list[str]:
    """argv of ``pipefarm run RUN --backend ENGINE`` with ``workers`` worker slots."""
    args = ["run", str(run_dir), "--backend", engine, "--no-progress", *extra]
    if engine == "mpi":  # rank 0 coordinates: one rank more than the workers
        from mpi_lib import mpiexec_pipefarm

        return mpiexec_pipefarm(workers + 1, *args)
    args += ["--workers", str(workers)]
    if address is not None:
        args += ["--address", address]
    return [sys.executable, "-m", "pipefarm", *args]


def start(engine: str, run_dir: str | os.PathLike[str], workers: int = 2,
          address: str | None = None, env: dict[str, str] | None = None,
          *extra: str) -> subprocess.Popen[str]:
    """``pipefarm run`` started (its own session, so that a signal to its group reaches only
    it); stdout and stderr as text pipes."""
    return subprocess.Popen(
        run_argv(engine, run_dir, workers, address, *extra),
        env={**engine_env(engine), **(env or {})}, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
        start_new_session=True)


def finish(proc: subprocess.Popen[str], timeout: float = RUN_TIMEOUT_S
           ) -> subprocess.CompletedProcess[str]:
    """Wait for ``proc`` (its process group SIGKILLed if it overstays: no hang)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"pipefarm run did not end in {timeout} s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def execute_on(engine: str, run_dir: str | os.PathLike[str], workers: int = 2,
               address: str | None = None, env: dict[str, str] | None = None,
               timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run ``run_dir`` on ``engine`` to its end; the finished ``pipefarm run`` process."""
    return finish(start(engine, run_dir, workers, address, env), timeout)


def kill_group(proc: subprocess.Popen[str], sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


# --- one Dask cluster for the session ----------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DaskCluster:
    """``dask scheduler`` on loopback plus one ``dask worker`` process of ``nworkers``
    single-threaded workers, each its own process group."""

    def __init__(self, nworkers: int = 2) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        port = _free_port()
        # no pipe to read: a thread reading it would stay in this process for the session, and
        # a process with a second thread starts local workers fresh instead of forking them
        sched = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
             "--port", str(port), "--no-dashboard"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self.procs.append(sched)
        T.SHARED_ENGINES.add(sched.pid)
        try:
            self.address = f"tcp://127.0.0.1:{port}"
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", self.address,
                 "--nworkers", str(nworkers), "--nthreads", "1", "--no-dashboard"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True))
            T.SHARED_ENGINES.add(self.procs[-1].pid)
            self._wait_workers(nworkers)
        except BaseException:
            self.stop()
            raise

    def _wait_workers(self, n: int) -> None:
        # in a child: a Client in this process would leave threads behind (see module doc)
        code = ("import sys, distributed; c = distributed.Client(sys.argv[1], timeout=60);"
                f" c.wait_for_workers({n}, timeout={DASK_START_TIMEOUT_S}); c.close()")
        subprocess.run([sys.executable, "-c", code, self.address], check=True,
                       timeout=DASK_START_TIMEOUT_S + 30, stdin=subprocess.DEVNULL,
                       capture_output=True)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


_dask: DaskCluster | None = None


def shared_dask_address() -> str:
    """The address of this process's one Dask cluster, started on first use, stopped at exit."""
    global _dask
    if _dask is None:
        _dask = DaskCluster()
        atexit.register(_dask.stop)
    return _dask.address


# --- what a finished run looks like -------------------------------------------------------------
def outcomes(run, task: int) -> list[str]:
    return [a.outcome for a in run.attempts(task)]


def assert_once_each(run, ids, allowed: tuple[str, ...] = ()) -> None:
    """Every task in ``ids`` succeeded exactly once (its last attempt), other attempts only of
    the ``allowed`` outcomes."""
    for t in ids:
        got = outcomes(run, t)
        assert got.count("succeeded") == 1 and got[-1] == "succeeded", (t, got)
        assert set(got[:-1]) <= set(allowed), (t, got)


# --- task functions (imported by reference by every engine's workers) ---------------------------
def write_atomic(path: str | os.PathLike[str], text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    Path(tmp).write_text(text)
    os.replace(tmp, path)


def spawn_sleeper_then_sleep(pid_dir: str, seconds: float = 60.0) -> str:
    """First attempt: start a grandchild ``sleep`` (its pid to ``pid_dir/grandchild``), then
    sleep past any timeout; later attempts return at once."""
    d = Path(pid_dir)
    if (d / "grandchild").exists():
        return "second"
    child = subprocess.Popen(["sleep", str(seconds)])
    write_atomic(d / "grandchild", str(child.pid))
    time.sleep(seconds)
    return "first"


def record_pid(record_dir: str, i: int, seconds: float = 0.0) -> int:
    """Sleep, note this process's pid in ``record_dir/i`` (one line per call: calls are
    counted), return ``3 * i``."""
    time.sleep(seconds)
    fd = os.open(os.path.join(record_dir, str(i)), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)
    return 3 * i

"""A portable run: interrupted on each backend in turn and resumed on the next, local -> dask
-> array -> mpi -> local, its state the run directory alone (DESIGN.md "Backends")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import engines_lib as E
import pytest
import tasks_lib as T
from cli_lib import ok
from mpi_lib import mpi_env, require_mpi

import pipefarm as pf

N = 40
#: each task's sleep: 40 tasks on 2 workers take ~8 s a step, time enough to interrupt each
TASK_S = 0.4


def _done(d) -> dict[int, tuple[int, object]]:
    """task -> (its succeeded attempt, result), journals folded (``pipefarm status`` folds)."""
    json.loads(ok("status", d, "--json", cwd=d.parent))
    with pf.Run.open(d, readonly=True) as run:
        out = {}
        for t in run.tasks(state="succeeded"):
            (a,) = [a.attempt for a in run.attempts(t.id) if a.outcome == "succeeded"]
            out[t.id] = (a, run.result(t.id))
        return out


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_dask_array_mpi_local(tmp_path):
    require_mpi()
    address = E.require("dask")
    d, marks = tmp_path / "run", tmp_path / "marks"
    marks.mkdir()
    with pf.Run.create(d) as run:
        ids = list(run.map(E.record_pid, [str(marks)] * N, range(N), [TASK_S] * N))
    kept: dict[int, tuple[int, object]] = {}

    def step(proc, stop, more=4):
        """Let ``more`` tasks succeed, then ``stop`` the processes; check nothing recorded
        before was lost or changed."""
        nonlocal kept
        target = len(kept) + more
        def progressed():
            if proc.poll() is not None:  # ended before it was interrupted
                raise AssertionError(f"exit {proc.returncode} before the interrupt:\n"
                                     + proc.stderr.read()[-3000:])
            return len(_done(d)) >= target

        T.wait_until(progressed, 90, interval=0.2, what=f"{target} tasks succeeded")
        rcs = stop(proc)
        now = _done(d)
        assert len(now) < N, f"the step ran everything ({rcs}): nothing was left to resume"
        assert {t: now.get(t) for t in kept} == kept, "a recorded result was lost"
        kept = now
        return rcs

    # local: the coordinator SIGKILLed (its workers die with it)
    def sigkill(p):
        E.kill_group(p)
        return p.wait(30)

    assert step(E.start("local", d, 2), sigkill) == -signal.SIGKILL

    # dask: Ctrl-C
    def sigint(p):
        E.kill_group(p, signal.SIGINT)
        return E.finish(p, 60).returncode

    assert step(E.start("dask", d, 2, address), sigint) == 130

    # array: `pipefarm array --launch mpiexec -n 2` (two `pipefarm worker`s sharing the run
    # directory, as inside an allocation), the workers told their walltime is up (their
    # warning signal, SIGTERM): each finishes its running task, hands the rest back and exits
    array = subprocess.Popen([sys.executable, "-m", "pipefarm", "array", str(d), "--launch",
                              "mpiexec", "-n", "2"], env=mpi_env(), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)

    def walltime(p):
        workers = [x for x in T.descendants(p.pid) if b"pipefarm\0worker" in _cmdline(x)]
        assert len(workers) == 2, workers
        for x in workers:
            os.kill(x, signal.SIGTERM)
        return E.finish(p, 60).returncode

    try:
        step(array, walltime)  # exit 1: tasks are left
    finally:
        E.kill_group(array)

    # mpi: the coordinator (rank 0) SIGKILLed; the MPI job ends with it
    def kill_rank0(p):
        ranks = E.mpi_rank_pids(p.pid)
        assert 0 in ranks, ranks
        os.kill(ranks[0], signal.SIGKILL)
        try:
            return p.wait(30)
        finally:
            E.kill_group(p)
            for pid in ranks.values():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            T.wait_until(lambda: not any(T.is_alive(r) for r in ranks.values()), 10,
                         what="every rank gone")

    mpi = E.start("mpi", d, 2)
    try:
        assert step(mpi, kill_rank0) != 0
    finally:  # a failed step leaves no MPI job behind
        for pid in [*E.mpi_rank_pids(mpi.pid).values(), mpi.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        mpi.wait()

    # local again, to the end
    p = E.execute_on("local", d, 2)
    assert p.returncode == 0, p.stderr[-3000:]
    final = _done(d)
    assert {t: final[t] for t in kept} == kept
    assert {t: r for t, (_, r) in final.items()} == {t: 3 * i for i, t in enumerate(ids)}
    with pf.Run.open(d) as run:
        E.assert_once_each(run, ids, allowed=("lost", "released"))
    used = json.loads(ok("status", d, "--json", cwd=tmp_path))["backends"]
    assert {"local", "dask", "array", "mpi"} <= set(used), used


@pytest.mark.slow
def test_array_launch_is_listed_among_the_backends(tmp_path):
    require_mpi()
    d = tmp_path / "run"
    with pf.Run.create(d) as run:
        run.map(T.square, range(2))
    p = subprocess.run([sys.executable, "-m", "pipefarm", "array", str(d), "--launch", "mpiexec",
                        "-n", "1"], env=mpi_env(), stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "array" in json.loads(ok("status", d, "--json", cwd=tmp_path))["backends"]

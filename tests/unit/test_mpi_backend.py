"""The ``mpi`` backend under a real ``mpiexec``: rank 0 coordinates, ranks 1..N-1 run tasks.

No mocks: a real Open MPI (or MPICH) job runs ``pipefarm run RUN --backend mpi`` on a run of
Python and command tasks, with a timeout and a retry among them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tasks_lib as T
from mpi_lib import mpi_env, mpiexec_pipefarm, require_mpi

import pipefarm as pf


def test_import_does_not_initialise_mpi() -> None:
    """``import pipefarm`` and the mpi backend's package never import mpi4py (MPI_Init)."""
    code = ("import sys, pipefarm, pipefarm.backends.mpi, pipefarm.backends.base as b;"
            " b.backend_class('local');"
            " raise SystemExit('mpi4py' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_mpi_listed_as_backend() -> None:
    assert "mpi" in pf.backends.installed()


@pytest.mark.slow
def test_mpiexec_runs_python_and_command_tasks(tmp_path) -> None:
    require_mpi()
    d = tmp_path / "run"
    run = pf.Run.create(d)
    squares = run.map(T.square, range(300))
    echoes = run.submit_cmd(["sh", "-c", "echo out {i}; echo err {i} >&2"],
                            [{"i": str(i)} for i in range(100)])
    [slow] = run.map(T.sleep_then, [1], [30.0], timeout=0.5)
    [flaky] = run.map(T.fail_first_time, [str(tmp_path / "flag")], [7], retries=1)
    run.close()

    p = subprocess.run(mpiexec_pipefarm(3, "run", str(d), "--backend", "mpi", "--no-progress"),
                       env=mpi_env(), capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 1, p.stderr  # the timed-out task failed for good, nothing else
    assert "402 tasks (401 succeeded, 1 failed)" in p.stderr, p.stderr

    run = pf.Run.open(d)
    try:
        for t in squares:
            assert run.result(t) == (t - squares[0]) ** 2
            assert [a.outcome for a in run.attempts(t)] == ["succeeded"]
        for i, t in enumerate(echoes):
            assert run.output(t) == f"out {i}\n".encode()
            assert run.output(t, stream="stderr") == f"err {i}\n".encode()
            assert [a.outcome for a in run.attempts(t)] == ["succeeded"]
        [timed_out] = run.attempts(slow)
        assert timed_out.outcome == "timed_out" and "timed out after 0.5 s" in timed_out.error
        assert [a.outcome for a in run.attempts(flaky)] == ["failed", "succeeded"]
        assert run.result(flaky) == 7
        # every worker ran on a rank, not in rank 0: two worker ranks, each a worker process
        # (one replaced after the timeout)
        workers = {a.worker for t in squares for a in run.attempts(t)}
        assert 1 <= len(workers) <= 3
    finally:
        run.close()


@pytest.mark.slow
def test_too_few_ranks_is_a_clear_error(tmp_path) -> None:
    require_mpi()
    d = tmp_path / "run"
    pf.Run.create(d).close()
    p = subprocess.run(mpiexec_pipefarm(1, "run", str(d), "--backend", "mpi", "--no-progress"),
                       env=mpi_env(), capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert p.returncode != 0
    assert "needs at least 2 MPI ranks" in p.stderr, p.stderr


@pytest.mark.slow
def test_array_launch_mpiexec_backend_mpi(tmp_path) -> None:
    """``pipefarm array RUN --launch mpiexec -n 2 --backend mpi`` starts rank 0 plus 2 worker
    ranks running ``pipefarm run RUN --backend mpi`` and returns their exit status."""
    require_mpi()
    d = tmp_path / "run"
    run = pf.Run.create(d)
    ids = run.map(T.square, range(50))
    run.close()
    p = subprocess.run([sys.executable, "-m", "pipefarm", "array", str(d), "--launch", "mpiexec",
                        "-n", "2", "--backend", "mpi"], env=mpi_env(), capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    run = pf.Run.open(d)
    try:
        assert [run.result(t) for t in ids] == [i * i for i in range(50)]
        assert "mpi" in run.store.backends_used()
    finally:
        run.close()


def test_array_backend_mpi_needs_launch(tmp_path) -> None:
    d = tmp_path / "run"
    pf.Run.create(d).close()
    p = subprocess.run([sys.executable, "-m", "pipefarm", "array", str(d), "--scheduler", "slurm",
                        "--backend", "mpi"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "--backend mpi goes with --launch" in p.stderr, p.stderr


@pytest.mark.slow
def test_python_script_under_mpiexec_runs_execute_backend_mpi(tmp_path) -> None:
    """``mpiexec -n 3 python sweep.py`` with ``run.execute(backend="mpi")``: rank 0 runs the
    run, ranks 1..2 serve tasks inside that call and end there; only rank 0 goes past it."""
    require_mpi()
    d = tmp_path / "run"
    with pf.Run.create(d) as run:
        ids = run.map(T.square, range(100))
    script = tmp_path / "sweep.py"
    script.write_text(
        "import pipefarm as pf\n"
        f"run = pf.Run.open({str(d)!r})\n"
        "summary = run.execute(backend='mpi', progress=False)\n"
        "print('past execute:', summary.counts['succeeded'], flush=True)\n")
    env = mpi_env()
    env["PYTHONPATH"] = os.pathsep.join([str(Path(T.__file__).parent),
                                         env.get("PYTHONPATH", "")])
    p = subprocess.run([require_mpi(), "-n", "3", sys.executable, str(script)], env=env,
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("past execute: 100") == 1, p.stdout  # rank 0 only
    with pf.Run.open(d) as run:
        assert [run.result(t) for t in ids] == [i * i for i in range(100)]

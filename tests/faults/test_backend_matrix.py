"""The failure contract (DESIGN.md) on every backend: each row runs on each engine of
:data:`engines_lib.ENGINES` where it applies, through ``pipefarm run RUN --backend E``.

Each engine's own tests go deeper ("engine worker lost": a Dask worker, a Ray actor, an MPI
rank); here the same small runs must end the same way everywhere.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import engines_lib as E
import pytest
import tasks_lib as T

import pipefarm as pf

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(params=E.ENGINES)
def engine(request) -> tuple[str, str | None]:
    """(engine name, the address to reach it or None)."""
    return request.param, E.require(request.param)


def _run(engine, d, workers=2, env=None, ok=True):
    name, address = engine
    p = E.execute_on(name, d, workers, address, env)
    if ok:
        assert p.returncode == 0, (p.returncode, p.stderr[-3000:])
    return p


def _dir(tmp_path: Path, name: str) -> Path:
    p = tmp_path / name
    p.mkdir()
    return p


# --- worker killed mid-task (SIGKILL) ------------------------------------------------------------
def test_worker_killed_mid_task_is_lost_and_runs_again(tmp_path, engine):
    name, _ = engine
    if name == "sequential":
        pytest.skip("sequential runs tasks in the coordinator's own process: no worker to kill")
    d, pids = tmp_path / "run", _dir(tmp_path, "pids")
    with pf.Run.create(d) as run:
        victim = run.submit_task(T.pid_then_sleep, (str(pids), 0, 60.0))
        others = run.map(T.square, range(6))
    proc = E.start(name, d, 2, engine[1])
    try:
        pid = int(T.wait_until(lambda: (pids / "0").exists() and (pids / "0").read_text(),
                               60, what="the victim task to start"))
        os.kill(pid, signal.SIGKILL)
        p = E.finish(proc)
    finally:
        E.kill_group(proc)
    assert p.returncode == 0, p.stderr[-3000:]
    with pf.Run.open(d) as run:
        assert run.result(victim) == ("second", 0)
        assert E.outcomes(run, victim) == ["lost", "succeeded"]
        assert [run.result(t) for t in others] == [i * i for i in range(6)]
        E.assert_once_each(run, others)


# --- task exceeds its timeout ------------------------------------------------------------------
SHELL_SLEEPER = ("if [ -e {flag} ]; then echo second; exit 0; fi;"
                 " sleep 60 & echo $! > {pid}.tmp; mv {pid}.tmp {pid}; touch {flag}; wait")


@pytest.mark.parametrize("kind", ["py", "cmd"])
def test_timeout_kills_the_process_group_and_retries(tmp_path, engine, kind):
    name, _ = engine
    if name == "sequential" and kind == "py":
        pytest.skip("sequential times a Python task out in its own process (SIGALRM): there is"
                    " no process group of the task's to kill")
    d, pids = tmp_path / "run", _dir(tmp_path, "pids")
    with pf.Run.create(d) as run:
        if kind == "py":
            t = run.submit_task(E.spawn_sleeper_then_sleep, (str(pids),), timeout=1.0, retries=1,
                                backoff=0.01)
        else:
            (t,) = run.submit_cmd(SHELL_SLEEPER.format(flag=pids / "flag", pid=pids / "grandchild"),
                                  timeout=1.0, retries=1, backoff=0.01)
    t0 = time.monotonic()
    _run(engine, d)
    assert time.monotonic() - t0 < 60
    grandchild = int((pids / "grandchild").read_text())
    T.wait_until(lambda: not T.is_alive(grandchild), 10, what="the task's grandchild to be killed")
    with pf.Run.open(d) as run:
        attempts = run.attempts(t)
        assert [a.outcome for a in attempts] == ["timed_out", "succeeded"]
        assert "timed out after 1 s" in (attempts[0].error or ""), attempts[0]
        if kind == "py":
            assert run.result(t) == "second"
        else:
            assert run.output(t) == b"second\n"


# --- retries with backoff ------------------------------------------------------------------------
def test_retries_wait_their_backoff(tmp_path, engine):
    d = tmp_path / "run"
    backoff = 0.4
    with pf.Run.create(d) as run:
        t = run.submit_task(T.count_then, (str(tmp_path / "count"), 3, "third"), retries=2,
                            backoff=backoff)
        spent = run.submit_task(T.raise_value_error, (5,), retries=1, backoff=0.01)
    p = _run(engine, d, ok=False)
    assert p.returncode == 1, p.stderr[-3000:]  # `spent` failed for good
    with pf.Run.open(d) as run:
        attempts = run.attempts(t)
        assert [a.outcome for a in attempts] == ["failed", "failed", "succeeded"]
        assert run.result(t) == "third"
        # exponential: backoff, then 2 x backoff (timestamps to the store's resolution)
        for n, (before, after) in enumerate(zip(attempts, attempts[1:], strict=False)):
            assert after.started_at - before.ended_at >= backoff * 2 ** n - 0.05, attempts
        assert E.outcomes(run, spent) == ["failed", "failed"]
        assert run.tasks(ids=[spent])[0].state == "failed"
        assert "bad value 5" in run.attempts(spent)[-1].error


# --- dependencies --------------------------------------------------------------------------------
def test_a_failed_dependency_skips_its_dependents(tmp_path, engine):
    d, order = tmp_path / "run", str(tmp_path / "order")
    with pf.Run.create(d) as run:
        bad = run.submit_task(T.raise_value_error, (1,))
        child = run.submit_task(T.ident, ("never",), after=[bad])
        grandchild = run.submit_task(T.ident, ("never",), after=[child])
        first = run.submit_task(T.log_start, (order, "a", 0.3))
        second = run.submit_task(T.log_start, (order, "b"), after=[first])
    p = _run(engine, d, ok=False)
    assert p.returncode == 1 and "2 task(s) skipped" in p.stderr, p.stderr[-3000:]
    with pf.Run.open(d) as run:
        assert [t.state for t in run.tasks(ids=[bad, child, grandchild])] == [
            "failed", "skipped", "skipped"]
        assert run.attempts(child) == [] and run.attempts(grandchild) == []
        assert Path(order).read_text().split() == ["a", "b"]
        assert run.result(second) == "b"
        a_end = run.attempts(first)[0].ended_at
        assert run.attempts(second)[0].started_at >= a_end


# --- cancel --------------------------------------------------------------------------------------
def test_cancelled_tasks_do_not_run_and_their_dependents_are_skipped(tmp_path, engine):
    d, marks = tmp_path / "run", _dir(tmp_path, "marks")
    with pf.Run.create(d) as run:
        ids = run.map(T.mark_and_double, [str(marks)] * 6, range(6))
        after = run.submit_task(T.ident, ("never",), after=[ids[1]])
        assert run.cancel([ids[1], ids[2]]) == 2
    p = _run(engine, d, ok=False)
    assert p.returncode == 1 and "2 task(s) cancelled" in p.stderr, p.stderr[-3000:]
    assert sorted(int(m.name) for m in marks.iterdir()) == [0, 3, 4, 5]
    with pf.Run.open(d) as run:
        states = [t.state for t in run.tasks(ids=[*ids, after])]
        assert states == ["succeeded", "cancelled", "cancelled", "succeeded", "succeeded",
                          "succeeded", "skipped"]
        assert [run.result(t) for t in (ids[0], ids[3])] == [0, 6]


# --- command tasks: output captured --------------------------------------------------------------
def test_command_and_python_output_is_captured(tmp_path, engine):
    d = tmp_path / "run"
    with pf.Run.create(d) as run:
        cmds = run.submit_cmd(["sh", "-c", "echo out {i}; echo err {i} >&2"],
                              [{"i": str(i)} for i in range(4)])
        failing = run.submit_cmd("echo before failing; exit 3")[0]
    p = _run(engine, d, ok=False)
    assert p.returncode == 1, p.stderr[-3000:]
    with pf.Run.open(d) as run:
        for i, t in enumerate(cmds):
            assert run.output(t) == f"out {i}\n".encode()
            assert run.output(t, stream="stderr") == f"err {i}\n".encode()
        (a,) = run.attempts(failing)
        assert a.outcome == "failed" and a.exit_code == 3, a
        assert run.output(failing) == b"before failing\n"


def test_python_task_output_is_captured(tmp_path, engine):
    """Every engine's workers capture what a Python task prints; sequential, which runs tasks in
    the caller's process for a debugger, leaves it on the caller's terminal (README: Output)."""
    d = tmp_path / "run"
    with pf.Run.create(d) as run:
        said = run.submit(print, "hello from a python task")
    p = _run(engine, d)
    with pf.Run.open(d) as run:
        if engine[0] == "sequential":
            assert "hello from a python task" in p.stdout and run.output(said) == b""
        else:
            assert run.output(said) == b"hello from a python task\n"


# --- priorities ------------------------------------------------------------------------------------
def test_higher_priority_first_with_one_worker(tmp_path, engine):
    d, order = tmp_path / "run", str(tmp_path / "order")
    with pf.Run.create(d) as run:
        for p in (0, 5, 1, 9, 3):
            run.submit_task(T.log_start, (order, f"p{p}"), priority=p)
        run.submit_task(T.log_start, (order, "cheap"), priority=2, cost=1.0)
        run.submit_task(T.log_start, (order, "dear"), priority=2, cost=50.0)
    _run(engine, d, workers=1)
    assert Path(order).read_text().split() == ["p9", "p5", "p3", "dear", "cheap", "p1", "p0"]


# --- Ctrl-C ----------------------------------------------------------------------------------------
def test_ctrl_c_exits_130_charges_nothing_and_resumes(tmp_path, engine):
    name, address = engine
    d, pids = tmp_path / "run", _dir(tmp_path, "pids")
    with pf.Run.create(d) as run:
        # first attempt of each sleeps, a resumed one returns at once
        ids = run.map(T.pid_then_sleep, [str(pids)] * 4, range(4), [60.0] * 4)
    proc = E.start(name, d, 2, address)
    try:
        T.wait_until(lambda: len(list(pids.glob("[0-9]"))) >= (1 if name == "sequential" else 2),
                     60, what="tasks running")
        E.kill_group(proc, signal.SIGINT)  # a terminal's Ctrl-C: the foreground group
        p = E.finish(proc, timeout=60)
    finally:
        E.kill_group(proc)
    # under mpiexec the status is mpiexec's: Open MPI says 1 for a rank that exited non-zero
    assert p.returncode == (1 if name == "mpi" else 130), (p.returncode, p.stderr[-3000:])
    assert "resume with: pipefarm run" in p.stderr, p.stderr[-3000:]
    with pf.Run.open(d) as run:
        assert {t.state for t in run.tasks()} == {"ready"}
        charged = [(t, o) for t in ids for o in E.outcomes(run, t) if o != "released"]
        assert charged == [], charged  # interrupted attempts released: no retry spent
    for i in range(4):  # the tasks never started sleep no more either
        (pids / str(i)).touch()
    _run(engine, d)
    with pf.Run.open(d) as run:
        E.assert_once_each(run, ids, allowed=("released",))
        assert sorted(run.result(t)[1] for t in ids) == list(range(4))


# --- a run that cannot start: a clear error, no hang -----------------------------------------------
def test_a_run_refused_at_start_is_a_clear_error_not_a_hang(tmp_path, engine, request):
    """Another ``pipefarm run`` executes RUN: every engine refuses at once, naming it."""
    name, address = engine
    d = tmp_path / "run"
    with pf.Run.create(d) as run:
        ids = run.map(T.sleep_then, range(2), [30.0] * 2)
    holder = E.start("local", d, 2)
    try:
        T.wait_until(lambda: (d / "run.lock").exists() or _running(d), 30,
                     what="the first run to hold RUN")
        p = E.execute_on(name, d, 2, address, timeout=15)
        assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
        assert "is being executed by pid" in p.stderr, p.stderr[-3000:]
    finally:
        E.kill_group(holder)
        holder.wait()
    with pf.Run.open(d) as run:
        assert all(o in ("running",) for t in ids for o in E.outcomes(run, t))


def _running(d: Path) -> bool:
    from pipefarm.store.sqlite.query import CatalogQuery

    q = CatalogQuery.open(d)
    try:
        return q.counts().get("running", 0) > 0
    finally:
        q.close()


# --- workers that cannot start: a clear error naming the cause, no hang ----------------------------
#: Put first on the coordinator's path (which the workers get): every process that is one of
#: pipefarm's workers dies as it starts, as in an environment whose library is missing on the
#: nodes. The coordinator itself starts fine.
BROKEN_SITE = '''
import os, sys
argv = " ".join(getattr(sys, "orig_argv", sys.argv))
rank = os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK"))
if "pipefarm.worker" in argv or rank not in (None, "0"):
    sys.stderr.write("broken environment: libfoo.so.1: cannot open shared object file\\n")
    raise SystemExit(3)
'''


def test_workers_that_cannot_start_are_a_clear_error_not_a_hang(tmp_path, engine):
    name, address = engine
    if name in ("local", "sequential"):
        pytest.skip("local: forked workers, tested in test_local_edges.py"
                    " (test_run_workers_dying_at_start_name_the_cause); sequential: no workers")
    site = _dir(tmp_path, "site")
    (site / "sitecustomize.py").write_text(BROKEN_SITE)
    d = tmp_path / "run"
    with pf.Run.create(d) as run:
        ids = run.map(T.square, range(4))
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    p = _run(engine, d, env={"PYTHONPATH": path}, ok=False)
    assert p.returncode != 0, p.stderr[-3000:]
    assert "libfoo.so.1" in p.stderr, p.stderr[-3000:]  # the cause, quoted
    with pf.Run.open(d) as run:  # nothing recorded is lost, nothing charged
        charged = [(t, a.outcome) for t in ids for a in run.attempts(t)
                   if a.outcome != "released"]
        assert charged == [], charged
        assert run.status()["ready"] == len(ids)

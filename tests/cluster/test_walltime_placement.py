"""Walltime-aware placement on array workers: a task that asked for more time
(``time_request``) than a worker has left before its walltime warning is not started by that
worker; it waits, spending nothing, for a worker with more time, and `pipefarm status` counts
it meanwhile. Real worker loops and processes, without a scheduler (and with SLURM where one
answers here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
from cluster_lib import slurm_up
from conftest import service_absent

import pipefarm as pf
from pipefarm.backends.array.worker_loop import work_loop
from pipefarm.store.shared_fs import FsJournalStore, list_claims
from pipefarm.task import Spec, dumps_args

PF = [sys.executable, "-m", "pipefarm"]


def pid_of_worker(x: int) -> tuple[int, int]:
    return x, os.getpid()


def left_from(seconds: float):
    """A worker's time left: ``seconds`` from now, counting down."""
    end = time.monotonic() + seconds
    return lambda: end - time.monotonic()


def test_a_short_worker_leaves_a_long_task_for_a_worker_with_time(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    store = FsJournalStore(run, lease_s=30.0, workers=2)
    fn = cloudpickle.dumps(pid_of_worker)
    long_spec = store.add_spec(Spec(kind="py", payload=fn, time_request=600.0))
    short_spec = store.add_spec(Spec(kind="py", payload=fn))
    (long_task,) = store.add_tasks(long_spec, [dumps_args((0,), {})])
    short = store.add_tasks(short_spec, [dumps_args((i,), {}) for i in range(1, 6)])
    ex = store.export()
    assert ex.final and ex.blocks >= 2  # the long task has a block (a time class) of its own

    t0 = time.monotonic()
    a = work_loop(run, "short", time_left=left_from(60.0), steal=False)
    assert time.monotonic() - t0 < 5, "the short worker waited instead of leaving"
    assert a.exit == "no time" and a.tasks == 5, a
    # one look per block it ran, then one that found only the long task: it left at once
    assert a.scans - a.blocks <= 1, f"the short worker spun: {a.scans} scans"
    store.fold()
    row = store.tasks(ids=[long_task])[0]
    assert row.state == "ready" and store.attempts(long_task) == []
    assert (row.failures, row.lost) == (0, 0)
    assert [store.result(t)[0] for t in short] == ["succeeded"] * 5
    claimed = {b for b in list_claims(store.layout)}
    assert len(claimed) == ex.blocks - 1, "the long task's block was never claimed"

    # while the short worker's heartbeat is fresh, status counts the task as waiting for time
    with pf.Run.open(run) as r:
        from pipefarm.observe.status import status_report

        rep = status_report(r)
    assert rep["waiting_for_time"] == 1 and 0 < rep["longest_time_left_s"] <= 60, rep

    b = work_loop(run, "long", time_left=left_from(3600.0), steal=False)
    assert b.exit == "finished" and b.tasks == 1, b
    store.fold()
    row = store.tasks(ids=[long_task])[0]
    assert row.state == "succeeded" and (row.failures, row.lost) == (0, 0)
    assert [(x.outcome, x.worker) for x in store.attempts(long_task)] == [("succeeded", "long")]
    store.close()


def test_a_block_is_handed_back_when_the_walltime_comes_too_close(tmp_path: Path) -> None:
    """A worker that had time when it claimed a block of long tasks, but no longer has it
    for the next one, hands the rest back unstarted (released: no budget spent)."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    store = FsJournalStore(run, lease_s=30.0, workers=1)
    sid = store.add_spec(Spec(kind="py", payload=cloudpickle.dumps(pid_of_worker),
                              time_request=100.0))
    ids = store.add_tasks(sid, [dumps_args((i,), {}) for i in range(4)])
    store.export(min_block=4)
    budget = iter([500.0, 500.0, 500.0, 50.0])  # register, claim, first task, then too little

    a = work_loop(run, "a", time_left=lambda: next(budget, 50.0), steal=False)
    assert a.tasks == 1 and a.released == 3 and a.no_time == 1 and a.exit == "no time", a
    store.fold()
    rows = store.tasks(ids=ids)
    assert [r.state for r in rows] == ["succeeded", "ready", "ready", "ready"]
    assert all((r.failures, r.lost) == (0, 0) for r in rows)
    b = work_loop(run, "b", time_left=lambda: 1000.0, steal=False)
    assert b.tasks == 3 and b.takeovers == 1 and b.exit == "finished", b
    store.fold()
    assert store.counts()["succeeded"] == 4
    store.close()


def pf_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*PF, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_cli_time_request_worker_time_and_status(tmp_path: Path) -> None:
    r = pf_cli("submit", "run", "--time-request", "10:00", "--", "echo", "long", cwd=tmp_path)
    assert "--time-request" in r.stderr and r.returncode == 2, "two fields are ambiguous"
    r = pf_cli("submit", "run", "--time-request", "0:10:00", "--", "echo", "long", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = pf_cli("submit", "run", "--array", "1-3", "--", "echo", "{index}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # export the tasks as blocks (a script is written, not submitted)
    r = pf_cli("array", "run", "--scheduler", "slurm", "--time", "30", "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    clean = {k: "" for k in ("SLURM_JOB_ID", "SLURM_JOB_END_TIME", "PIPEFARM_WALLTIME_END")}
    r = pf_cli("worker", "run", "--time", "1", "--warn-seconds", "0", cwd=tmp_path, env=clean)
    assert r.returncode == 0, r.stderr
    assert "exit='no time'" in r.stderr and "tasks=3" in r.stderr, r.stderr
    assert "left for a worker with more" in r.stderr
    r = pf_cli("status", "run", "--json", cwd=tmp_path)
    rep = json.loads(r.stdout)
    assert rep["counts"]["succeeded"] == 3 and rep["waiting_for_time"] == 1, rep
    r = pf_cli("status", "run", cwd=tmp_path)
    assert "waiting for a worker with more time: 1 task(s)" in r.stdout, r.stdout
    # the scripts' variable gives a worker its walltime when --time is not given
    r = pf_cli("worker", "run", cwd=tmp_path,
               env={**clean, "PIPEFARM_WALLTIME_END": str(time.time() + 3600),
                    "PIPEFARM_WARN_SECONDS": "120"})
    assert r.returncode == 0 and "exit='finished'" in r.stderr and "tasks=1" in r.stderr, r.stderr
    assert "from PIPEFARM_WALLTIME_END" in r.stderr
    rep = json.loads(pf_cli("status", "run", "--json", cwd=tmp_path).stdout)
    assert rep["counts"]["succeeded"] == 4 and rep["waiting_for_time"] == 0, rep


@pytest.mark.slow
@pytest.mark.scheduler
def test_slurm_element_with_a_short_walltime_leaves_the_long_task_to_the_next_array(
        tmp_path: Path) -> None:
    """Real SLURM: an element of 2 minutes (warning 60 s before) does not start a task that
    asked for 5 minutes and ends at once; an array with 20 minutes runs it."""
    if not slurm_up():
        service_absent("no SLURM here (see ../shared/ci/slurm-up.sh)")
    assert pf_cli("submit", "run", "--time-request", "300", "--", "echo", "long",
                  cwd=tmp_path).returncode == 0
    assert pf_cli("submit", "run", "--array", "1-4", "--", "echo", "{index}",
                  cwd=tmp_path).returncode == 0
    t0 = time.monotonic()
    r = pf_cli("array", "run", "--scheduler", "slurm", "--time", "2", "--warn-seconds", "60",
               "--submit", "--wait", "--poll", "2", cwd=tmp_path)
    assert time.monotonic() - t0 < 100, "the short element waited for its walltime"
    assert r.returncode != 0 and "1 task(s) left" in r.stderr, (r.stdout, r.stderr)
    assert "1 of them asked for more time (--time-request) than an element has" in r.stderr
    logs = "".join(p.read_text() for p in (tmp_path / "run" / "logs").glob("*.out"))
    assert "exit='no time'" in logs and "from PIPEFARM_WALLTIME_END" in logs, logs
    r = pf_cli("array", "run", "--scheduler", "slurm", "--time", "20", "--submit", "--wait",
               "--poll", "2", cwd=tmp_path)
    assert r.returncode == 0, (r.stdout, r.stderr)
    rep = json.loads(pf_cli("status", "run", "--json", cwd=tmp_path).stdout)
    assert rep["counts"]["succeeded"] == 5, rep


@pytest.mark.slow
@pytest.mark.scheduler
def test_a_worker_in_a_slurm_job_asks_squeue_for_its_time_left(tmp_path: Path) -> None:
    """Inside a real SLURM job with no variable giving the end (a worker started by hand or
    by srun in an allocation), the worker asks squeue once."""
    if not slurm_up():
        service_absent("no SLURM here (see ../shared/ci/slurm-up.sh)")
    out = tmp_path / "out"
    code = ("from pipefarm.backends.array.walltime import find_walltime; "
            "w = find_walltime(); print(w.source, round(w.left()))")
    job = subprocess.run(
        ["sbatch", "--parsable", "--time=7", "-o", str(out), "--wrap",
         f"env -u SLURM_JOB_END_TIME -u PIPEFARM_WALLTIME_END {sys.executable} -c '{code}'"],
        capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip()
    deadline = time.monotonic() + 60
    while not (out.exists() and out.read_text().strip()):
        assert time.monotonic() < deadline, f"job {job} wrote nothing"
        time.sleep(0.5)
    source, left = out.read_text().split()
    assert source == "squeue" and 7 * 60 - 30 < int(left) <= 7 * 60, out.read_text()

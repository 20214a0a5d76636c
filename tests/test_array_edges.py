"""Edges of the array backend with real processes, real signals and the real SLURM.

* a scheduler cancel (``scancel``: SIGTERM to every process of the job, SIGKILL after
  KillWait) makes the running command tasks ``lost``, never ``failed``;
* tasks under a generated array script start with default signal dispositions and an empty
  signal mask (a simulation that checkpoints on SIGUSR1 hears it), while the workers stay
  immune to a group-wide USR1;
* ``pipefarm array --submit --wait`` returns when the array is over, with what is left and how
  to finish it, also where the scheduler keeps no accounting;
* blocks are sized from the task count, the workers and the cost, and an idle worker takes the
  unstarted tail of a busy worker's block (split claims), exactly once through kills.

The SLURM tests need the single-host SLURM that .ci/run starts (../shared/ci/slurm-up.sh);
without it they skip, and with PIPEFARM_REQUIRE_SERVICES=1 they fail.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import service_absent
from test_schedulers import _slurm_up

PF = [sys.executable, "-m", "pipefarm"]


def pf(*args: str, cwd: Path, timeout: float = 600, env: dict | None = None
       ) -> subprocess.CompletedProcess:
    return subprocess.run([*PF, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env or os.environ.copy())


def need_slurm() -> None:
    if not _slurm_up():
        service_absent("no SLURM here (see ../shared/ci/slurm-up.sh)")


def query(run: Path, sql: str, args: tuple = ()) -> list[tuple]:
    con = sqlite3.connect(f"file:{run / 'catalog.db'}?mode=ro", uri=True)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


_SUBMITTED: list[str] = []


@pytest.fixture(autouse=True)
def _cancel_leftover_jobs():
    """A failed test must not leave its array running on the shared scheduler."""
    yield
    while _SUBMITTED:
        subprocess.run(["scancel", _SUBMITTED.pop()], capture_output=True, check=False)


def job_of(r: subprocess.CompletedProcess | str) -> str:
    out = r if isinstance(r, str) else r.stdout + r.stderr
    assert "submitted slurm job " in out, out
    job = out.split("submitted slurm job ")[1].split()[0]
    _SUBMITTED.append(job)
    return job


def in_queue(job: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                         text=True).stdout
    return bool(out.strip())


def wait_until(pred, timeout: float, what: str, step: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(step)


def shim(directory: Path, name: str, script: str) -> None:
    """An executable ``name`` in ``directory`` (put first on PATH)."""
    directory.mkdir(exist_ok=True)
    p = directory / name
    p.write_text("#!/bin/sh\n" + script)
    p.chmod(p.stat().st_mode | stat.S_IXUSR)


# --- 1. a scheduler cancel is a loss, not the tasks' failure --------------------------------------
@pytest.mark.scheduler
def test_scancel_makes_running_tasks_lost_not_failed(tmp_path: Path) -> None:
    need_slurm()
    n, marks, flag = 6, tmp_path / "marks", tmp_path / "finish-fast"
    marks.mkdir()
    # long the first time (until cancelled), instant once the flag exists
    r = pf("submit", "run", "--array", f"0-{n - 1}", "--", "sh", "-c",
           f"[ -e {flag} ] && exit 0; touch {marks}/{{index}}; sleep 30", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = pf("array", "run", "--scheduler", "slurm", "--elements", "2", "-w", "2", "--time", "10",
           "--submit", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    job = job_of(r)
    wait_until(lambda: len(list(marks.iterdir())) >= 4, 180, "four tasks to run")
    subprocess.run(["scancel", job], check=True)  # SIGTERM to every process, KILL after KillWait
    wait_until(lambda: not in_queue(job), 120, "the array to leave the queue")

    r = pf("status", "run", "--json", cwd=tmp_path)  # folds what the workers journaled
    assert r.returncode == 0, r.stderr
    counts = json.loads(r.stdout)["counts"]
    assert counts["failed"] == 0, counts
    run = tmp_path / "run"
    assert query(run, "SELECT count(*) FROM attempts WHERE outcome=1") == [(0,)], "no failed attempt"
    lost = query(run, "SELECT task, error FROM attempts WHERE outcome=3")
    assert len(lost) >= 4, lost
    assert all("SIGTERM" in (e or "") or "SIGKILL" in (e or "") for _, e in lost), lost
    assert query(run, "SELECT max(failures) FROM tasks") == [(0,)], "no retry spent"
    r = pf("failures", "run", cwd=tmp_path)
    assert r.returncode == 0 and "no failed tasks" in r.stdout, r.stdout

    flag.touch()
    r = pf("run", "run", "--workers", "2", "--no-progress", cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = query(run, "SELECT state, failures, lost FROM tasks")
    assert len(rows) == n and {s for s, _, _ in rows} == {4}, rows
    assert sum(lo for _, _, lo in rows) == len(lost) and {f for _, f, _ in rows} == {0}


# --- 3. tasks start with default signal dispositions ----------------------------------------------
@pytest.mark.scheduler
def test_tasks_under_an_array_script_hear_usr1_and_workers_survive_it(tmp_path: Path) -> None:
    need_slurm()
    n, marks = 2, tmp_path / "marks"
    marks.mkdir()
    # a "simulation" that checkpoints and exits on SIGUSR1; a shell keeps a signal that was
    # ignored on entry ignored, trap or not, so the trap only works with default dispositions
    task = (f"grep -E 'SigIgn|SigBlk' /proc/$$/status; trap 'echo checkpointed; exit 0' USR1; "
            f"touch {marks}/{{index}}; while :; do sleep 0.2; done")
    r = pf("submit", "run", "--array", f"0-{n - 1}", "--", "sh", "-c", task, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out_f, err_f = tmp_path / "wait.out", tmp_path / "wait.err"
    with open(out_f, "w") as out, open(err_f, "w") as err:
        waiter = subprocess.Popen(
            [*PF, "array", "run", "--scheduler", "slurm", "--elements", "1", "-w", "2", "--time",
             "10", "--submit", "--wait", "--poll", "2"],
            cwd=tmp_path, stdout=out, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_until(lambda: "submitted slurm job" in out_f.read_text(), 60, "the submission")
        job = job_of(out_f.read_text())
        wait_until(lambda: len(list(marks.iterdir())) == n, 180, "both tasks to run")
        # USR1 to every process of the job: the batch shell, the workers, the tasks
        subprocess.run(["scancel", "--signal=USR1", "--full", job], check=True)
        waiter.wait(timeout=120)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert waiter.returncode == 0, (out_f.read_text(), err_f.read_text())
    run = tmp_path / "run"
    assert query(run, "SELECT state, attempt FROM tasks") == [(4, 1)] * n, "once each, no loss"
    for t in range(1, n + 1):
        log = pf("logs", "run", str(t), cwd=tmp_path).stdout
        fields = dict(ln.split(":\t") for ln in log.splitlines() if ln.startswith("Sig"))
        assert int(fields["SigIgn"], 16) == 0 and int(fields["SigBlk"], 16) == 0, log
        assert "checkpointed" in log, log


# --- 6. --wait returns when the array is over -----------------------------------------------------
def _worker_killing_run(tmp_path: Path, n: int) -> None:
    # every task kills the worker running it: the array ends with every task left
    r = pf("submit", "run", "--array", f"0-{n - 1}", "--", "sh", "-c", "kill -KILL $PPID",
           cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def _no_accounting(tmp_path: Path, *, purged: bool) -> dict:
    """The real SLURM as a site without accounting sees it: ``sacct`` refuses; with ``purged``
    the controller has also forgotten the job (``MinJobAge`` has passed)."""
    bin_dir = tmp_path / "bin"
    shim(bin_dir, "sacct", "echo 'sacct: error: Slurm accounting storage is disabled' >&2\nexit 1\n")
    if purged:
        real = subprocess.run(["sh", "-c", "command -v scontrol"], capture_output=True,
                              text=True).stdout.strip()
        shim(bin_dir, "scontrol",
             'case "$*" in *"show job"*) echo "slurm_load_jobs error: Invalid job id specified"'
             f' >&2; exit 1 ;; esac\nexec {real} "$@"\n')
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.scheduler
@pytest.mark.parametrize("purged", [False, True], ids=["ended", "purged"])
def test_wait_returns_when_the_array_is_over_without_accounting(tmp_path: Path,
                                                                purged: bool) -> None:
    need_slurm()
    n = 5
    _worker_killing_run(tmp_path, n)
    env = _no_accounting(tmp_path, purged=purged)
    t0 = time.monotonic()
    r = pf("array", "run", "--scheduler", "slurm", "--elements", "1", "-w", "1", "--time", "10",
           "--lease", "4", "--submit", "--wait", "--poll", "2", cwd=tmp_path, env=env,
           timeout=240)
    took = time.monotonic() - t0
    assert r.returncode == 1, (r.stdout, r.stderr)
    err = r.stderr
    assert "the array is over" in err, err
    if purged:
        assert "no longer reports job" in err and "no worker heartbeats" in err, err
    else:
        assert "ended (failed)" in err, err  # scontrol still knows it: the worker was killed
    assert f"with {n} task(s) left ({n} ready)" in err, err
    assert "pipefarm run run" in err and "pipefarm array run --scheduler slurm --submit" in err
    assert took < 150, f"--wait took {took:.0f} s after the array ended"

"""Many hosts through the run directory alone: real SLURM and Grid Engine arrays of workers.

These need the single-host schedulers that .ci/run starts (../shared/ci/slurm-up.sh and
sge-up.sh); without them they skip, and with PIPEFARM_REQUIRE_SERVICES=1 they fail.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_lib import SGE_ENV, sge_up, slurm_up
from conftest import service_absent

PF = [sys.executable, "-m", "pipefarm"]


def pf(*args: str, cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*PF, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env or os.environ.copy())


def catalog_rows(run: Path) -> list[tuple]:
    con = sqlite3.connect(f"file:{run / 'catalog.db'}?mode=ro", uri=True)
    try:
        return con.execute("SELECT id, state, attempt FROM tasks ORDER BY id").fetchall()
    finally:
        con.close()


def stale_and_lost(run: Path) -> tuple[int, int]:
    con = sqlite3.connect(f"file:{run / 'catalog.db'}?mode=ro", uri=True)
    try:
        stale = con.execute("SELECT count(*) FROM attempts WHERE outcome=5").fetchone()[0]
        lost = con.execute("SELECT count(*) FROM attempts WHERE outcome=3").fetchone()[0]
        return stale, lost
    finally:
        con.close()


def markers_ok(markers: Path, n: int) -> None:
    """Every task ran and wrote exactly its own marker line."""
    lines = {}
    for f in markers.iterdir():
        lines[int(f.name)] = f.read_text()
    assert sorted(lines) == list(range(n))


def slurm_elements(job: str) -> dict[str, str]:
    out = subprocess.run(["squeue", "-h", "-r", "-j", job, "-o", "%i %T"], capture_output=True,
                         text=True).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


@pytest.mark.scheduler
def test_slurm_array_survives_a_cancelled_element(tmp_path: Path) -> None:
    if not slurm_up():
        service_absent("no SLURM here (see ../shared/ci/slurm-up.sh)")
    n, markers = 5000, tmp_path / "markers"
    markers.mkdir()
    # --retries 1: SIGKILL of the element can reach a task's process a moment before its
    # worker, which then records an ordinary failure (exit -9) for it
    r = pf("submit", "run", "--array", f"0-{n - 1}", "--retries", "1", "--", "sh", "-c",
           f"echo {{index}} >> {markers}/{{index}}; sleep 0.005", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = pf("array", "run", "--scheduler", "slurm", "--elements", "4", "-w", "2", "--time", "20",
           "--lease", "8", "--submit", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    job = r.stdout.split("job ")[1].split()[0]
    # wait until every element runs and some work is done, then cancel one element
    deadline = time.time() + 120
    while True:
        els = slurm_elements(job)
        done = sum(1 for _ in markers.iterdir())
        if sum(1 for s in els.values() if s == "RUNNING") == 4 and done > 300:
            break
        assert time.time() < deadline, (els, done)
        time.sleep(0.5)
    victim = f"{job}_1"
    t_kill = time.time()
    subprocess.run(["scancel", "--signal=KILL", "--full", victim], check=True)
    # follow the rest of the array to its end, folding as the submitter would
    deadline = time.time() + 400
    while slurm_elements(job):
        assert time.time() < deadline, "array did not finish"
        time.sleep(2)
    r = pf("status", "run", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    counts = json.loads(r.stdout)["counts"]
    if counts["succeeded"] != n:  # the victim's last blocks may still be leased: take them back
        r = pf("run", "run", "--workers", "2", "--no-progress", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    rows = catalog_rows(tmp_path / "run")
    assert len(rows) == n and {s for _, s, _ in rows} == {4}, "every task succeeded, once each"
    markers_ok(markers, n)
    # the killed element's blocks were taken over by survivors (Claimed adoptions folded in)
    stale, lost = stale_and_lost(tmp_path / "run")
    con = sqlite3.connect(f"file:{tmp_path / 'run' / 'catalog.db'}?mode=ro", uri=True)
    epochs = con.execute("SELECT max(epoch) FROM fs_blocks").fetchone()[0]
    con.close()
    assert epochs >= 1, "no block was ever re-claimed after the element was cancelled"
    claims = sorted((tmp_path / "run" / "fs" / "claims").iterdir(), key=lambda p: p.stat().st_mtime)
    retaken = [p for p in claims if p.name.count(".") == 1 and not p.name.endswith(".0")]
    assert retaken, "no claim file of epoch >= 1"
    first_retake = min(p.stat().st_mtime for p in retaken)
    assert first_retake - t_kill < 8 * 4, "re-claim took far longer than the lease"


@pytest.mark.scheduler
def test_sge_array_runs_every_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in SGE_ENV.items():
        monkeypatch.setenv(k, os.environ.get(k, v))
    if not sge_up():
        service_absent("no Grid Engine here (see ../shared/ci/sge-up.sh)")
    n = 400
    r = pf("submit", "run", "--array", f"0-{n - 1}", "--", "sh", "-c", "echo {index}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    env = os.environ.copy()
    r = pf("array", "run", "--scheduler", "sge", "--elements", "2", "-w", "2", "--time", "10",
           "--extra", "-V", "--submit", "--wait", "--poll", "3", cwd=tmp_path, env=env)
    assert r.returncode == 0, (r.stdout, r.stderr)
    rows = catalog_rows(tmp_path / "run")
    assert len(rows) == n and {s for _, s, _ in rows} == {4}
    out = pf("logs", "run", "17", cwd=tmp_path)
    assert out.stdout == "16\n"


@pytest.mark.parametrize("scheduler,var,value", [
    ("pbs", "PBS_ARRAY_INDEX", "0"),
    ("lsf", "LSB_JOBINDEX", "1"),
])
def test_generated_script_runs_real_workers_locally(tmp_path: Path, scheduler: str, var: str,
                                                    value: str) -> None:
    """PBS Pro and LSF cannot be installed here: run their scripts with the array variable set."""
    n = 300
    r = pf("submit", "run", "--array", f"0-{n - 1}", "--", "sh", "-c", "echo {index}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = pf("array", "run", "--scheduler", scheduler, "--elements", "2", "-w", "2", "--time", "10",
           cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    script = r.stdout.split("wrote ")[1].split(";")[0]
    env = {**os.environ, var: value, "PBS_O_WORKDIR": str(tmp_path)}
    subprocess.run(["bash", script], cwd=tmp_path, env=env, check=True, timeout=300,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = pf("status", "run", "--json", cwd=tmp_path)
    assert json.loads(r.stdout)["counts"]["succeeded"] == n


@pytest.mark.scheduler
def test_slurm_walltime_warning_releases_unstarted_work_at_once(tmp_path: Path) -> None:
    """An element hits its time limit: the warning signal makes its worker finish the running
    task and hand the rest of its block back at once; a second array finishes them without
    waiting for the (long) lease."""
    if not slurm_up():
        service_absent("no SLURM here (see ../shared/ci/slurm-up.sh)")
    n = 160
    r = pf("submit", "run", "--array", f"0-{n - 1}", "--", "sleep", "0.5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lease = 300
    r = pf("array", "run", "--scheduler", "slurm", "--elements", "1", "-w", "1", "--time", "1",
           "--warn-seconds", "50", "--lease", str(lease), "--submit", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    claims = tmp_path / "run" / "fs" / "claims"
    logs = tmp_path / "run" / "logs"
    deadline = time.time() + 150
    stats = None
    while stats is None:
        assert time.time() < deadline, "the walltime warning never stopped the worker"
        time.sleep(1)
        text = "".join(p.read_text(errors="replace") for p in logs.glob("*.out"))
        stats = re.search(r"worker done: .*released=(\d+),.*exit='(\w+)'", text)
    t_released = time.time()
    # the warning stopped it (the limit is 60 s; 160 x 0.5 s would take 80 s)
    assert stats.group(2) == "stopped", text
    # the unstarted rest of its block was handed back at once (unless the warning came just as
    # a block ended: then there was nothing to hand back, and the next blocks were never claimed)
    if int(stats.group(1)):
        assert any(p.name.endswith(".released") for p in claims.iterdir())
    r = pf("array", "run", "--scheduler", "slurm", "--elements", "1", "-w", "2", "--time", "10",
           "--submit", "--wait", "--poll", "3", cwd=tmp_path)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert time.time() - t_released < lease / 2, "the released work waited for the lease"
    rows = catalog_rows(tmp_path / "run")
    assert len(rows) == n and {s for _, s, _ in rows} == {4}
    # released tasks spent no attempt: every task has exactly one attempt
    assert {a for _, _, a in rows} == {1}

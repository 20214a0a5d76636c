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
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_lib import slurm_up
from conftest import service_absent

PF = [sys.executable, "-m", "pipefarm"]


def pf(*args: str, cwd: Path, timeout: float = 600, env: dict | None = None
       ) -> subprocess.CompletedProcess:
    return subprocess.run([*PF, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env or os.environ.copy())


def need_slurm() -> None:
    if not slurm_up():
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
    task = (f"grep -E 'SigIgn|SigBlk' /proc/self/status; trap 'echo checkpointed; exit 0' USR1; "
            f"echo $$ > {marks}/{{index}}.tmp; mv {marks}/{{index}}.tmp {marks}/{{index}}; "
            "while :; do sleep 0.2; done")
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
        wait_until(lambda: len([p for p in marks.iterdir() if p.suffix != ".tmp"]) == n, 180,
                   "both tasks to run")
        # USR1 to the job's session (SGE and `scancel --signal --full` send it group-wide):
        # the batch shell ignores it, the workers keep running
        subprocess.run(["scancel", "--signal=USR1", "--full", job], check=True)
        time.sleep(2)
        assert in_queue(job) and waiter.poll() is None, "USR1 stopped the array"
        for p in marks.iterdir():  # the checkpoint signal, to each simulation
            os.kill(int(p.read_text()), signal.SIGUSR1)
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
        # 32 and 33 are glibc's own signals (see test_task_endings._LIBC_SIGNALS)
        libc = (1 << 31) | (1 << 32)
        assert int(fields["SigIgn"], 16) & ~libc == 0 and int(fields["SigBlk"], 16) == 0, log
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


# --- 10. blocks sized for the workers, and split claims -------------------------------------------
@pytest.mark.scheduler
def test_launch_srun_spreads_eight_long_tasks_over_two_workers(tmp_path: Path) -> None:
    """8 x `sleep 2` under `pipefarm array --launch srun -n 2` in an sbatch allocation: both
    workers run tasks and the whole takes about 8 s, not 16 s (one block of all 8)."""
    need_slurm()
    r = pf("submit", "run", "--array", "0-7", "--", "sleep", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    script = tmp_path / "alloc.sh"
    script.write_text(
        "#!/bin/bash\n#SBATCH --ntasks=2\n#SBATCH --cpus-per-task=1\n"
        f"#SBATCH --output={tmp_path}/alloc.out\n"
        f"cd {tmp_path}\nexec {sys.executable} -m pipefarm array run --launch srun -n 2\n")
    r = subprocess.run(["sbatch", "--parsable", "--wait", str(script)], capture_output=True,
                       text=True, timeout=300)
    out = (tmp_path / "alloc.out").read_text() if (tmp_path / "alloc.out").exists() else ""
    assert r.returncode == 0, (r.stdout, r.stderr, out)
    rows = query(tmp_path / "run", "SELECT state, worker, started_at, ended_at FROM tasks")
    assert [s for s, *_ in rows] == [4] * 8, (rows, out)
    assert len({w for _, w, _, _ in rows}) == 2, "both workers ran tasks"
    span = max(e for *_, e in rows) - min(s for _, _, s, _ in rows)
    assert span < 12, f"8 x 2 s on 2 workers took {span:.1f} s (one worker: 16 s)"


def split_run(tmp_path: Path, n: int, seconds: float, *, lease: float) -> Path:
    """``n`` command tasks of ``seconds`` each, in ONE exported block; each appends a line to
    its own marker file (so every execution is counted)."""
    from pipefarm.run import Run
    from pipefarm.store.shared_fs import Layout, export, write_config

    marks = tmp_path / "marks"
    marks.mkdir()
    r = pf("submit", "run", "--array", f"0-{n - 1}", "--", "sh", "-c",
           f"echo x >> {marks}/{{index}}; sleep {seconds}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run = Run.open(tmp_path / "run")
    try:
        lay = Layout(run.path)
        lay.make()
        write_config(lay, lease)
        assert export(lay, run.store, workers=1, min_block=n).blocks == 1
    finally:
        run.close()
    return tmp_path / "run"


def worker(run: Path, wid: str) -> subprocess.Popen:
    return subprocess.Popen([*PF, "worker", str(run), "--id", wid], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def journal(run: Path, wid: str) -> list:
    from pipefarm.store.journal import read_journal
    from pipefarm.store.shared_fs import decode

    return [decode(r) for r in read_journal(run / "fs" / "journal" / f"{wid}.log").records]


def agreed_cut(run: Path):
    """The first agreed split of block 1 (a cut slot naming a child), or None."""
    from pipefarm.store.shared_fs import read_cut

    for p in sorted((run / "fs" / "claims").glob("1.*.cut*")):
        cut = read_cut(p.read_bytes())
        if cut is not None:
            return cut
    return None


def successes(run: Path) -> dict[int, int]:
    """Successful ends per task in every journal."""
    from pipefarm.states import Outcome
    from pipefarm.store.journal import Ended

    out: dict[int, int] = {}
    for p in (run / "fs" / "journal").glob("*.log"):
        for rec in journal(run, p.name[:-4]):
            if isinstance(rec, Ended) and rec.outcome == Outcome.SUCCEEDED:
                out[rec.task] = out.get(rec.task, 0) + 1
    return out


def started_by(run: Path, wid: str) -> int:
    from pipefarm.store.journal import Started

    return sum(isinstance(r, Started) for r in journal(run, wid))


def reap(*procs: subprocess.Popen, timeout: float = 90) -> None:
    for p in procs:
        try:
            p.wait(timeout)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()


def check_exactly_once(tmp_path: Path, run: Path, n: int) -> dict:
    r = pf("status", "run", "--json", cwd=tmp_path)  # folds every journal into the catalog
    assert r.returncode == 0, r.stderr
    counts = json.loads(r.stdout)["counts"]
    assert counts["succeeded"] == n, counts
    ok = successes(run)
    assert sorted(ok) == list(range(1, n + 1)) and set(ok.values()) == {1}, ok
    assert query(run, "SELECT count(*) FROM attempts WHERE outcome=5") == [(0,)], "no stale"
    return counts


@pytest.mark.parametrize("victim", ["holder", "thief"])
def test_a_split_survives_the_death_of_either_worker(tmp_path: Path, victim: str) -> None:
    """An idle worker asks a busy one for the tail of its block; right after they agreed, one
    of them is SIGKILLed. The survivor (and a late worker) take the dead one's part over:
    every task succeeds exactly once, and the part given away is never run by the block's
    takeover, nor the kept part by the child's."""
    n, lease = 12, 2.0
    run = split_run(tmp_path, n, 0.5, lease=lease)
    marks = tmp_path / "marks"
    holder = worker(run, "V")
    wait_until(lambda: started_by(run, "V") >= 1, 30, "the holder's first task", 0.05)
    thief = worker(run, "T")
    procs = [holder, thief]
    try:
        wait_until(lambda: agreed_cut(run) is not None, 30, "an agreed split", 0.02)
        cut = agreed_cut(run)
        assert cut.thief == "T" and 2 <= len(cut.tasks) < n
        (holder if victim == "holder" else thief).kill()
        late = worker(run, "W")  # takes part in the takeover
        procs.append(late)
        survivor = thief if victim == "holder" else holder
        reap(survivor, late)
        assert survivor.returncode == 0 and late.returncode == 0, (survivor.stderr.read(),
                                                                    late.stderr.read())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    counts = check_exactly_once(tmp_path, run, n)
    assert counts["failed"] == 0
    from pipefarm.store.journal import Claimed

    claims = [r for w in ("V", "T", "W") for r in journal(run, w) if isinstance(r, Claimed)]
    given = set(cut.tasks)
    if victim == "holder":  # block 1 taken over: never the given tasks
        over = [c for c in claims if c.block == 1 and c.epoch >= 1]
        assert over, "the dead holder's block was taken over"
        assert all(not given & set(c.tasks or ()) for c in over), (given, over)
    else:  # the child taken over: never the kept tasks
        over = [c for c in claims if c.block == cut.child and c.epoch >= 1]
        assert over, "the dead thief's child block was taken over"
        assert all(set(c.tasks or ()) <= given for c in over), (given, over)
    # a task ran twice only if it was in flight in the killed worker (then lost, once)
    twice = {int(p.name) + 1 for p in marks.iterdir() if p.read_text().count("x") > 1}
    lost = {t for (t,) in query(run, "SELECT task FROM attempts WHERE outcome=3")}
    assert len(lost) <= 1 and twice <= lost, (twice, lost)


def test_a_split_whose_both_workers_died_is_taken_back_by_the_catalog(tmp_path: Path) -> None:
    """Holder and thief SIGKILLed right after agreeing: `pipefarm run` (local backend) takes
    both parts back (the catalog seals the block's cut slots and finds the child) and runs
    each task once more at most."""
    n, lease = 12, 1.0
    run = split_run(tmp_path, n, 0.5, lease=lease)
    holder = worker(run, "V")
    wait_until(lambda: started_by(run, "V") >= 1, 30, "the holder's first task", 0.05)
    thief = worker(run, "T")
    try:
        wait_until(lambda: agreed_cut(run) is not None, 30, "an agreed split", 0.02)
    finally:
        for p in (holder, thief):
            p.kill()
            p.wait()
    cut = agreed_cut(run)
    time.sleep(lease + 0.5)  # their heartbeats expire
    r = pf("run", "run", "--workers", "2", "--no-progress", cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = query(run, "SELECT state FROM tasks")
    assert [s for (s,) in rows] == [4] * n
    assert query(run, "SELECT count(*) FROM fs_children WHERE id=?", (cut.child,)) == [(1,)]
    runs = {int(p.name) + 1: p.read_text().count("x") for p in (tmp_path / "marks").iterdir()}
    assert sorted(runs) == list(range(1, n + 1)) and max(runs.values()) <= 2, runs
    assert sum(v == 2 for v in runs.values()) <= 2, "only the two tasks in flight ran twice"


def test_random_kills_with_splits_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    """Four workers on blocks far too big for a fair share, so they split each other's
    blocks, while workers are SIGKILLed and replaced at random: every task succeeds exactly
    once, splits happened, and so did takeovers of split blocks."""
    import random

    from test_fsjournal import kill, make_run, spawn, value_of

    from pipefarm.store.shared_fs import read_cut

    n, lease = 1200, 1.0
    store, sid, ids = make_run(tmp_path, value_of, [(i, 0.01) for i in range(n)],
                               lease_s=lease, workers=4, export=False, max_lost=50)
    store.export(min_block=400)  # three blocks for four workers: the fourth must steal
    run = store.layout.run
    rng = random.Random(1200)
    live = {f"w{i}": spawn(run, f"w{i}") for i in range(4)}
    gen, kills = 4, 0
    t0 = time.monotonic()
    while kills < 8 and time.monotonic() - t0 < 20:
        time.sleep(rng.uniform(0.3, 0.8))
        running = [w for w, p in live.items() if p.is_alive()]
        if len(running) < 2:
            break
        kill(live.pop(rng.choice(running)))
        kills += 1
        live[f"w{gen}"] = spawn(run, f"w{gen}")
        gen += 1
    for p in live.values():
        p.join(120)
        assert p.exitcode == 0, "a worker did not finish by itself"
    st = store.fold()
    assert st.corrupt == []
    assert store.counts()["succeeded"] == n
    ok = successes(Path(run))
    assert sorted(ok) == list(ids) and set(ok.values()) == {1}
    claims = Path(run) / "fs" / "claims"
    cuts = [c for p in claims.glob("*.cut*") if (c := read_cut(p.read_bytes())) is not None]
    assert len(cuts) >= 2, "workers split each other's blocks"
    assert kills >= 4
    stale = store.catalog.db.execute("SELECT count(*) FROM attempts WHERE outcome=5").fetchone()
    assert stale == (0,)
    store.close()

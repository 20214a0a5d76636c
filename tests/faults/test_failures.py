"""The failure contract (DESIGN.md, "Failure contract"), one test per row, local backend.

Real processes, real signals, real files: workers are killed with SIGKILL, coordinators run in
subprocesses and are killed or interrupted, the WAL is torn by truncation, and a real tmpfs
fills up.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import tasks_lib as T
from conftest import service_absent

import pipefarm as pf

# --- helpers ---------------------------------------------------------------------------------------

COORDINATOR = """\
import os, sys
import pipefarm as pf
run = pf.Run.open(sys.argv[1])
print("coordinator", os.getpid(), flush=True)
summary = run.execute(workers=int(sys.argv[2]), progress=False)
print("finished", summary, flush=True)
"""


def _script(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _start(tmp_path: Path, script: Path, *args: object) -> subprocess.Popen:
    out = open(tmp_path / f"{script.stem}.out", "ab")  # noqa: SIM115 - closed by the child's end
    err = open(tmp_path / f"{script.stem}.err", "ab")  # noqa: SIM115
    try:
        return subprocess.Popen([sys.executable, str(script), *map(str, args)],
                                stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    finally:
        out.close()
        err.close()


def _ro(run_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{run_dir / 'catalog.db'}?mode=ro", uri=True, timeout=10)


def _count_state(run_dir: Path, state: int) -> int:
    try:
        con = _ro(run_dir)
    except sqlite3.Error:
        return 0
    try:
        return con.execute("SELECT count(*) FROM tasks WHERE state=?", (state,)).fetchone()[0]
    except sqlite3.Error:
        return 0
    finally:
        con.close()


def _succeeded_results(run_dir: Path) -> dict[int, bytes]:
    """Task id -> pickled result of every succeeded task, read without taking any lock."""
    con = _ro(run_dir)
    try:
        return dict(con.execute("SELECT id, result FROM tasks WHERE state=4").fetchall())
    finally:
        con.close()


def _integrity(run_dir: Path) -> str:
    con = sqlite3.connect(run_dir / "catalog.db")
    try:
        return con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()


def _marker_lines(marker_dir: Path, n: int) -> list[int]:
    out = []
    for i in range(n):
        p = marker_dir / str(i)
        out.append(len(p.read_text().splitlines()) if p.exists() else 0)
    return out


def _assert_no_survivors(pids: list[int], fragment: str, within: float = 3.0) -> None:
    """Every pid in ``pids`` and every process running ``fragment`` is dead (or a zombie)."""
    def gone():
        return not [p for p in pids if T.is_alive(p)] and not T.live_procs_with_cmdline(fragment)

    try:
        T.wait_until(gone, within, what="worker processes to die")
    except AssertionError:
        left = [p for p in pids if T.is_alive(p)] + T.live_procs_with_cmdline(fragment)
        raise AssertionError(f"orphaned worker processes survived the coordinator: {left}") from None


def _assert_all_succeeded_once(run: pf.Run, n: int, expected) -> None:
    counts = run.status()
    assert counts["succeeded"] == n, counts
    table = run.results()
    ids = table.column("task_id").to_pylist()
    assert len(ids) == n and len(set(ids)) == n
    assert set(table.column("state").to_pylist()) == {"succeeded"}
    for tid, value in zip(ids, table.column("result").to_pylist(), strict=True):
        assert value == expected(tid), (tid, value)


# --- worker killed mid-task ------------------------------------------------------------------------
def test_worker_sigkill_mid_task_is_lost_and_rerun(tmp_path):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    run = pf.Run.create(tmp_path / "run")
    victim = run.submit_task(T.pid_then_sleep, (str(pid_dir), 0, 60.0))
    others = run.map(T.square, range(40))
    killed: list[int] = []

    def on_progress(counts):
        p = pid_dir / "0"
        if not killed and p.exists():
            pid = int(p.read_text())
            assert pid != os.getpid()
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    t0 = time.monotonic()
    summary = run.execute(workers=2, progress=False, on_progress=on_progress)
    assert killed, "the task never recorded its worker pid"
    assert time.monotonic() - t0 < 30
    assert not T.is_alive(killed[0])
    assert summary.ok, summary
    outcomes = [a.outcome for a in run.attempts(victim)]
    assert outcomes == ["lost", "succeeded"]
    assert "lost" in (run.attempts(victim)[0].error or "")
    assert run.result(victim) == ("second", 0)
    # nothing else affected: every other task succeeded on its one attempt
    for tid, x in zip(others, range(40), strict=True):
        assert run.result(tid) == x * x
        assert [a.outcome for a in run.attempts(tid)] == ["succeeded"]
    row = run.tasks(ids=[victim])[0]
    assert row.failures == 0 and row.lost == 1


# --- coordinator killed ----------------------------------------------------------------------------
def test_coordinator_sigkill_no_orphans_and_resume(tmp_path):
    n = 2000
    run_dir, markers = tmp_path / "run", tmp_path / "markers"
    markers.mkdir()
    run = pf.Run.create(run_dir)
    run.map(T.mark_and_double, [str(markers)] * n, range(n), [0.002] * n)
    run.close()
    script = _script(tmp_path, "coord_kill.py", COORDINATOR)
    proc = _start(tmp_path, script, run_dir, 2)
    try:
        T.wait_until(lambda: _count_state(run_dir, 4) >= n // 2, 60, what="half the tasks")
        workers = T.descendants(proc.pid)
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert workers, "the coordinator had no worker processes"
    _assert_no_survivors(workers, str(script), within=2.0)

    before = _succeeded_results(run_dir)
    assert n // 2 <= len(before) < n, len(before)
    t0 = time.monotonic()
    run = pf.Run.open(run_dir)
    summary = run.execute(workers=2, progress=False)
    assert time.monotonic() - t0 < 30, "old leases were not reaped at once"
    assert summary.ok, summary
    _assert_all_succeeded_once(run, n, lambda tid: 2 * (tid - 1))
    # nothing recorded before the kill was lost or redone
    after = _succeeded_results(run_dir)
    lines = _marker_lines(markers, n)
    for tid, blob in before.items():
        assert after[tid] == blob
        assert lines[tid - 1] == 1, f"task {tid} had succeeded before the kill but ran again"
    assert min(lines) >= 1


# --- timeouts --------------------------------------------------------------------------------------
def test_timeout_python_task_kills_and_replaces_worker(tmp_path):
    run = pf.Run.create(tmp_path / "run")
    sleeper = run.submit_task(T.sleep_forever, (100.0,), timeout=1)
    rest = run.map(T.square, range(20))
    t0 = time.monotonic()
    summary = run.execute(workers=1, progress=False)
    assert time.monotonic() - t0 < 20
    assert summary.counts["failed"] == 1 and summary.counts["succeeded"] == 20, summary
    attempts = run.attempts(sleeper)
    assert [a.outcome for a in attempts] == ["timed_out"]
    assert "timed out" in (attempts[0].error or "")
    with pytest.raises(pf.TaskFailed) as ei:
        run.result(sleeper)
    assert ei.value.state == "failed"
    # the only worker was killed; a replacement ran everything else
    table = run.results()
    workers = dict(zip(table.column("task_id").to_pylist(), table.column("worker").to_pylist(),
                       strict=True))
    assert all(workers[t] != attempts[0].worker for t in rest)
    assert [run.result(t) for t in rest] == [x * x for x in range(20)]


def test_timeout_kills_task_stuck_in_uninterruptible_wait(tmp_path):
    pids = tmp_path / "pids"
    run = pf.Run.create(tmp_path / "run")
    reader = run.submit_task(T.stuck_in_read, (str(pids),), timeout=1, retries=1, backoff=0.2)
    waiter = run.submit_task(T.stuck_in_sigwait, (str(pids),), timeout=1)
    quick = run.map(T.square, range(10))
    t0 = time.monotonic()
    summary = run.execute(workers=2, progress=False)
    assert time.monotonic() - t0 < 30
    assert summary.counts["failed"] == 2 and summary.counts["succeeded"] == 10, summary
    assert [a.outcome for a in run.attempts(reader)] == ["timed_out", "timed_out"]
    assert [a.outcome for a in run.attempts(waiter)] == ["timed_out"]
    row = run.tasks(ids=[reader])[0]
    assert row.state == "failed" and row.failures == 2
    # each stuck process really was killed
    stuck = [int(x) for x in pids.read_text().split()]
    assert len(stuck) == 3
    T.wait_until(lambda: not any(T.is_alive(p) for p in stuck), 5, what="stuck tasks to die")
    assert [run.result(t) for t in quick] == [x * x for x in range(10)]


# --- a task that raises ----------------------------------------------------------------------------
def test_raising_task_fails_with_remote_traceback(tmp_path):
    run = pf.Run.create(tmp_path / "run")
    tid = run.submit(T.explode_with, 7)
    ok = run.submit(T.square, 3)
    summary = run.execute(workers=2, progress=False)
    assert summary.counts["failed"] == 1 and summary.counts["succeeded"] == 1
    assert run.result(ok) == 9
    with pytest.raises(pf.TaskFailed) as ei:
        run.result(tid)
    err = ei.value
    text = str(err)
    assert "Boom" in text and "explode_with got 7" in text
    assert "explode_with" in err.remote_traceback and "Traceback" in err.remote_traceback
    assert err.state == "failed" and err.task == tid
    assert [a.outcome for a in run.attempts(tid)] == ["failed"]


def test_raising_task_cause_is_original_exception(tmp_path):
    run = pf.Run.create(tmp_path / "run")
    tid = run.submit(T.explode_with, 7)
    run.execute(workers=1, progress=False)
    with pytest.raises(pf.TaskFailed) as ei:
        run.result(tid)
    assert isinstance(ei.value.cause, T.Boom)
    assert str(ei.value.cause) == "explode_with got 7"


def test_retries_with_backoff_then_success(tmp_path):
    counter = tmp_path / "counter"
    run = pf.Run.create(tmp_path / "run")
    tid = run.submit_task(T.count_then, (str(counter), 3, "third time lucky"), retries=2,
                          backoff=0.3)
    summary = run.execute(workers=2, progress=False)
    assert summary.ok
    assert run.result(tid) == "third time lucky"
    attempts = run.attempts(tid)
    assert [a.outcome for a in attempts] == ["failed", "failed", "succeeded"]
    assert [a.attempt for a in attempts] == [1, 2, 3]
    assert "attempt 1 fails on purpose" in attempts[0].error
    # exponential backoff: 0.3 s before the second attempt, 0.6 s before the third
    assert attempts[1].started_at - attempts[0].ended_at >= 0.3 - 0.05
    assert attempts[2].started_at - attempts[1].ended_at >= 0.6 - 0.05
    assert len(counter.read_text().splitlines()) == 3


# --- bad tasks refused at submission ---------------------------------------------------------------
def test_unpicklable_argument_refused_nothing_written(tmp_path):
    run = pf.Run.create(tmp_path / "run")
    run.map(T.square, range(3))
    assert len(run) == 3
    items: list[object] = list(range(1000))
    items[499] = threading.Lock()
    with pytest.raises(pf.SubmissionError) as ei:
        run.map(T.ident, items)
    msg = str(ei.value)
    assert "pickle" in msg and "lock" in msg.lower()
    assert "nothing was submitted" in msg
    assert len(run) == 3
    with pytest.raises(pf.SubmissionError):
        run.submit(T.ident, threading.Lock())
    with pytest.raises(pf.SubmissionError):
        run.submit_task(T.add, (1,), {"c": threading.Lock()})
    assert len(run) == 3
    assert run.status()["ready"] == 3
    # what was refused is really gone: a reopened run holds and runs just the three
    run.close()
    run = pf.Run.open(tmp_path / "run")
    assert len(run) == 3
    assert run.execute(workers=1, progress=False).ok


def test_uncallable_or_unpicklable_function_refused(tmp_path):
    import functools

    run = pf.Run.create(tmp_path / "run")
    run.submit(T.square, 2)
    for bad in (42, "tasks_lib.square", None):
        with pytest.raises(pf.SubmissionError, match="not callable"):
            run.map(bad, [1, 2])
        with pytest.raises(pf.SubmissionError, match="not callable"):
            run.submit(bad, 1)
    with pytest.raises(pf.SubmissionError, match="cannot use"):
        run.map(functools.partial(T.add, threading.Lock()), [1])
    assert len(run) == 1


# --- torn writes -----------------------------------------------------------------------------------
SUBMIT_AND_RUN_FOREVER = """\
import sys
import pipefarm as pf
import tasks_lib as T
run = pf.Run.open(sys.argv[1])
n = int(sys.argv[2])
while True:
    run.map(T.ident, range(n))
    print("added", flush=True)
    run.execute(workers=1, progress=False)
    print("executed", flush=True)
"""


def test_torn_write_kill_during_large_commits(tmp_path):
    n = 20000
    rng = random.Random(1234)
    run_dir = tmp_path / "run"
    pf.Run.create(run_dir).close()
    script = _script(tmp_path, "big_batches.py", SUBMIT_AND_RUN_FOREVER)
    done_before: set[int] = set()
    for _ in range(3):
        proc = _start(tmp_path, script, run_dir, n)
        time.sleep(rng.uniform(0.6, 1.8))
        proc.kill()
        proc.wait(10)
        assert _integrity(run_dir) == "ok"
        run = pf.Run.open(run_dir)
        total = len(run)
        assert total % n == 0, f"a batch of {n} was half written: {total} tasks"
        counts = run.status()
        assert sum(counts.values()) == total
        done = {t.id for t in run.tasks(state="succeeded")}
        assert done_before <= done, "a recorded result was lost"
        done_before = done
        run.close()
    run = pf.Run.open(run_dir)
    total = len(run)
    assert total >= n
    summary = run.execute(workers=2, progress=False)
    assert summary.ok, summary
    _assert_all_succeeded_once(run, total, lambda tid: (tid - 1) % n)
    assert _integrity(run_dir) == "ok"


def test_torn_wal_tail_is_repaired(tmp_path):
    n = 1200
    run_dir, markers = tmp_path / "run", tmp_path / "markers"
    markers.mkdir()
    run = pf.Run.create(run_dir)
    run.map(T.mark_and_double, [str(markers)] * n, range(n), [0.002] * n)
    run.close()
    script = _script(tmp_path, "coord_torn.py", COORDINATOR)
    proc = _start(tmp_path, script, run_dir, 2)
    try:
        T.wait_until(lambda: _count_state(run_dir, 4) >= n * 2 // 3, 60, what="2/3 of the tasks")
    finally:
        proc.kill()
        proc.wait(10)
    wal = run_dir / "catalog.db-wal"
    assert wal.exists() and wal.stat().st_size > 32
    page = int.from_bytes((run_dir / "catalog.db").read_bytes()[16:18], "big")
    page = 65536 if page == 1 else page
    frame = 24 + page
    nframes = (wal.stat().st_size - 32) // frame
    assert 2 < nframes < 8192, nframes  # no automatic checkpoint has copied frames into the db
    rng = random.Random(99)
    cuts = sorted({rng.randrange(1, nframes) for _ in range(3)})
    recorded = _succeeded_results(run_dir)
    lost_any = False
    for k, cut in enumerate(cuts):
        copy = tmp_path / f"copy{k}"
        copy.mkdir(mode=0o700)
        shutil.copy2(run_dir / "catalog.db", copy / "catalog.db")
        shutil.copy2(wal, copy / "catalog.db-wal")
        size = 32 + cut * frame + rng.randrange(1, frame)  # torn in the middle of a frame
        os.truncate(copy / "catalog.db-wal", size)

        before_lines = _marker_lines(markers, n)
        run = pf.Run.open(copy)
        assert _integrity(copy) == "ok"
        assert len(run) == n and sum(run.status().values()) == n
        survived = _succeeded_results(copy)
        lost_any |= len(survived) < len(recorded)
        for tid in survived:
            assert run.result(tid) == 2 * (tid - 1)
        summary = run.execute(workers=2, progress=False)
        assert summary.ok, summary
        _assert_all_succeeded_once(run, n, lambda tid: 2 * (tid - 1))
        assert _integrity(copy) == "ok"
        after_lines = _marker_lines(markers, n)
        for i in range(n):
            ran = after_lines[i] - before_lines[i]
            if i + 1 in survived:
                assert ran == 0, f"task {i + 1} had a result and ran again"
            else:
                assert ran == 1, f"task {i + 1} lost its result and ran {ran} times"
        run.close()
    assert lost_any, "no cut tore off a committed transaction: the test tested nothing"


# --- disk full -------------------------------------------------------------------------------------
def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        service_absent(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")


def test_disk_full_clear_error_then_resume(tmp_path):
    mnt = tmp_path / "mnt"
    _mount_tmpfs(mnt, "4m")
    try:
        # 8 MB of results on a 4 MB disk; 50 ms per task so results commit a few at a time
        size, n = 200 * 1024, 40
        run_dir = mnt / "run"
        run = pf.Run.create(run_dir)
        run.map(T.big_bytes, range(n), [size] * n, [0.05] * n)
        with pytest.raises(pf.DiskFull, match="full") as ei:
            run.execute(workers=2, progress=False)
        assert "run again to resume" in str(ei.value) or "resume" in str(ei.value)
        run.close()

        run = pf.Run.open(run_dir)
        done = [t.id for t in run.tasks(state="succeeded")]
        assert 0 < len(done) < n
        for tid in done:  # every committed result is whole
            assert run.result(tid) == T.big_bytes(tid - 1, size)
        subprocess.run(["mount", "-o", "remount,size=32m", str(mnt)], check=True)
        summary = run.execute(workers=2, progress=False)
        assert summary.ok, summary
        for tid in range(1, n + 1):
            assert run.result(tid) == T.big_bytes(tid - 1, size)
        assert _integrity(run_dir) == "ok"
        run.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill_disk(where: Path) -> Path:
    filler = where / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    return filler


def test_disk_full_rolled_back_commit_leaves_no_result_files(tmp_path):
    from pipefarm.task import Finished

    mnt = tmp_path / "mnt"
    _mount_tmpfs(mnt, "4m")
    try:
        run = pf.Run.create(mnt / "run")
        run.map(T.ident, [1, 2])
        store = run.store
        leases, _ = store.lease_ready(2, set())
        assert len(leases) == 2
        now = time.time()
        big = [Finished(x.task, x.token, int(pf.Outcome.SUCCEEDED), now, now, b"r" * 300_000,
                        attempt=x.attempt) for x in leases]
        filler = None
        with pytest.raises(pf.DiskFull):
            with store.transaction():
                store.finish_leased("worker-a", [], [big[0]])
                filler = _fill_disk(mnt)
                store.finish_leased("worker-b", [], [big[1]])
        filler.unlink()
        assert run.status()["ready"] == 2  # nothing was committed...
        left = sorted(p.name for p in (mnt / "run" / "results").iterdir())
        assert left == [], f"result files of a rolled-back commit remain: {left}"
        run.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# --- huge results ----------------------------------------------------------------------------------
def test_huge_result_is_a_file_and_reads_back(tmp_path):
    size = 5 * 1024 * 1024 + 3
    run_dir = tmp_path / "run"
    run = pf.Run.create(run_dir)
    big = run.submit(T.big_bytes, 1, size)
    small = run.submit(T.big_bytes, 2, 100)
    assert run.execute(workers=2, progress=False).ok
    assert run.result(big) == T.big_bytes(1, size)
    assert run.result(small) == T.big_bytes(2, 100)
    con = _ro(run_dir)
    rows = dict(con.execute("SELECT id, result_file FROM tasks").fetchall())
    con.close()
    assert rows[small] is None
    assert rows[big] is not None and (run_dir / rows[big]).stat().st_size > size
    table = run.results()
    assert table.column("result").to_pylist()[big - 1] == T.big_bytes(1, size)
    run.close()
    assert pf.Run.open(run_dir).result(big) == T.big_bytes(1, size)


# --- Ctrl-C ----------------------------------------------------------------------------------------
def test_ctrl_c_stops_cleanly_and_resume_spends_no_attempts(tmp_path):
    n = 300
    run_dir, markers = tmp_path / "run", tmp_path / "markers"
    markers.mkdir()
    run = pf.Run.create(run_dir)
    run.map(T.mark_and_double, [str(markers)] * n, range(n), [0.02] * n, retries=0)
    run.close()
    script = _script(tmp_path, "coord_int.py", COORDINATOR)
    proc = _start(tmp_path, script, run_dir, 2)
    try:
        T.wait_until(lambda: _count_state(run_dir, 4) >= n // 3, 60, what="a third of the tasks")
        workers = T.descendants(proc.pid)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(10)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc != 0
    assert took < 5, f"Ctrl-C took {took:.1f} s"
    err = (tmp_path / "coord_int.err").read_text()
    assert "KeyboardInterrupt" in err
    assert "finished" not in (tmp_path / "coord_int.out").read_text()
    assert workers
    _assert_no_survivors(workers, str(script), within=2.0)

    run = pf.Run.open(run_dir)
    counts = run.status()
    assert 0 < counts["succeeded"] < n and counts["claimed"] == counts["running"] == 0, counts
    before = _succeeded_results(run_dir)
    summary = run.execute(workers=2, progress=False)
    assert summary.ok, summary
    _assert_all_succeeded_once(run, n, lambda tid: 2 * (tid - 1))
    lines = _marker_lines(markers, n)
    for tid in before:
        assert lines[tid - 1] == 1
    for row in run.tasks():
        assert row.failures == 0 and row.lost == 0, row
        outcomes = {a.outcome for a in run.attempts(row.id)}
        assert outcomes <= {"released", "succeeded"}, (row.id, outcomes)


# --- one coordinator per run -----------------------------------------------------------------------
def test_second_execute_is_refused_with_runlocked(tmp_path):
    run_dir, markers = tmp_path / "run", tmp_path / "markers"
    markers.mkdir()
    run = pf.Run.create(run_dir)
    run.submit(T.mark_and_double, str(markers), 0, 30.0)
    run.close()
    script = _script(tmp_path, "coord_lock.py", COORDINATOR)
    proc = _start(tmp_path, script, run_dir, 1)
    try:
        T.wait_until(lambda: (markers / "0").exists(), 30, what="the task to start")
        other = pf.Run.open(run_dir)
        with pytest.raises(pf.RunLocked, match=f"pid {proc.pid}"):
            other.execute(workers=1, progress=False)
        with pytest.raises(pf.RunLocked):
            other.execute(backend="sequential", progress=False)
        assert other.status()["succeeded"] == 0
    finally:
        proc.kill()
        proc.wait(10)
    other.wait_idle(timeout=10)
    other.close()

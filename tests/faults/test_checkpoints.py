"""Task checkpoints across the ways an attempt ends without finishing: its worker SIGKILLed, a
timeout, a failure on every engine, and a walltime on array workers (the warning, then the
kill) -- real processes and signals; every later attempt starts from the newest checkpoint the
earlier one saved.

The tasks (``tests/checkpoint_lib.py``) count to N, saving a checkpoint at every step and
logging each attempt's starting point and steps.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import checkpoint_lib as C
import cloudpickle
import engines_lib as E
import pytest

import pipefarm as pf
from pipefarm.backends.array.worker_loop import work_loop
from pipefarm.execute.template import Command, encode_command, encode_values
from pipefarm.store.shared_fs import FsJournalStore
from pipefarm.task import Spec, dumps_args

FORK = mp.get_context("fork")


def resumed(log: str, n: int, at_least: int) -> int:
    """Two attempts: the second started where the first's last checkpoint left it (at least
    ``at_least``) and did exactly the steps after it. Returns where it started."""
    (f0, first), (start, second) = C.attempts_in(log)
    assert f0 == 0
    assert start >= at_least and start in (first[-1], first[-1] - 1), (first, start)
    assert second == list(range(start + 1, n + 1))
    return start


@pytest.mark.slow
def test_worker_sigkilled_mid_task_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    log, flag = str(tmp_path / "log"), str(tmp_path / "flag")
    run = pf.Run.create(tmp_path / "run")
    t = run.submit_task(C.count_to, (12, log), {"kill_at": 7, "flag": flag})
    others = run.map(C.count_to, [3] * 4, [str(tmp_path / f"o{i}") for i in range(4)])
    summary = run.execute(workers=2, progress=False)
    assert summary.ok, summary
    assert run.result(t) == 12
    assert [a.outcome for a in run.attempts(t)] == ["lost", "succeeded"]
    assert resumed(log, 12, 6) == 6  # killed at step 7, before saving it
    assert [run.result(o) for o in others] == [3] * 4
    assert not (tmp_path / "run" / "checkpoints").exists() or not os.listdir(
        tmp_path / "run" / "checkpoints"), "every task succeeded: its checkpoints are gone"


@pytest.mark.slow
def test_timed_out_attempt_is_resumed_by_its_retry(tmp_path: Path) -> None:
    log, flag = str(tmp_path / "log"), str(tmp_path / "flag")
    run = pf.Run.create(tmp_path / "run")
    t = run.submit_task(C.count_to, (10, log), {"hang_at": 6, "flag": flag},
                        timeout=2, retries=1, backoff=0)
    t0 = time.monotonic()
    assert run.execute(workers=1, progress=False).ok
    assert time.monotonic() - t0 < 20
    assert [a.outcome for a in run.attempts(t)] == ["timed_out", "succeeded"]
    assert resumed(log, 10, 5) == 5


@pytest.mark.slow
@pytest.mark.parametrize("engine", E.ENGINES)
def test_every_engine_resumes_python_and_command_tasks(tmp_path: Path, engine: str) -> None:
    """``pipefarm run --backend E``: every engine runs tasks in the same worker code, so a
    Python task's retry and a command's retry both go on from their checkpoints."""
    address = E.require(engine)
    log, cmd_log, flag = (str(tmp_path / n) for n in ("log", "cmd_log", "flag"))
    run = pf.Run.create(tmp_path / "run")
    py = run.submit_task(C.count_to, (8, log), {"fail_at": 4, "flag": flag}, retries=1,
                         backoff=0)
    # the command fails once, after step 3, leaving "3" in its directory
    once = C.COUNT_SH.replace('  sleep "$2"\n',
                              '  sleep "$2"\n  [ "$i" = 3 ] && mkdir "$3" 2>/dev/null && exit 5\n')
    (cmd,) = run.submit_cmd(["sh", "-c", once, "count", cmd_log, "0", str(tmp_path / "once")],
                            retries=1, backoff=0, checkpoint_dir=True)
    run.close()
    p = E.execute_on(engine, tmp_path / "run", 1, address)
    assert p.returncode == 0, (p.returncode, p.stderr[-3000:])
    run = pf.Run.open(tmp_path / "run")
    assert run.result(py) == 8
    assert C.attempts_in(log) == [(0, [1, 2, 3]), (3, [4, 5, 6, 7, 8])]
    assert [a.outcome for a in run.attempts(cmd)] == ["failed", "succeeded"]
    assert C.attempts_in(cmd_log) == [(0, [1, 2, 3]), (3, list(range(4, 21)))]
    assert not (tmp_path / "run" / "checkpoints" / str(cmd)).exists()
    run.close()


# --- array workers: the walltime warning, then the kill ---------------------------------------------
def _fs_run(tmp_path: Path, spec: Spec, args: list[bytes], lease_s: float) -> FsJournalStore:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    store = FsJournalStore(run, lease_s=lease_s, workers=1)
    sid = store.add_spec(spec)
    store.add_tasks(sid, args)
    store.export()
    return store


def _worker(run: str, wid: str) -> None:
    work_loop(run, wid, drain_signals=(signal.SIGTERM,), steal=False)


def _wait_for_step(log: str, step: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not (os.path.exists(log) and f"step {step}\n" in Path(log).read_text()):
        assert time.monotonic() < deadline, f"step {step} never came"
        time.sleep(0.02)


@pytest.mark.slow
def test_array_python_task_after_walltime_warning_and_kill_resumes_elsewhere(tmp_path: Path) -> None:
    """Worker a gets the warning (SIGTERM: it finishes its running task if it can), then the
    walltime kill (SIGKILL) mid-task; worker b takes the block over once a's lease expired and
    the task goes on from a's last checkpoint."""
    log = str(tmp_path / "log")
    spec = Spec(kind="py", payload=cloudpickle.dumps(C.count_to))
    store = _fs_run(tmp_path, spec, [dumps_args((40, log), {"step_s": 0.05})], lease_s=1.0)
    a = FORK.Process(target=_worker, args=(store.layout.run, "a"), daemon=True)
    a.start()
    _wait_for_step(log, 5)
    os.kill(a.pid, signal.SIGTERM)  # the walltime warning ...
    time.sleep(0.2)
    os.kill(a.pid, signal.SIGKILL)  # ... and the walltime itself
    a.join(10)
    stats = work_loop(store.layout.run, "b", steal=False)
    assert stats.takeovers == 1 and stats.exit == "finished", stats
    store.fold()
    (row,) = store.tasks()
    assert row.state == "succeeded" and (row.failures, row.lost) == (0, 1)
    assert [x.outcome for x in store.attempts(row.id)] == ["lost", "succeeded"]
    assert resumed(log, 40, 5) >= 5
    store.close()


@pytest.mark.slow
def test_array_command_task_killed_by_the_warning_resumes_from_its_checkpoint_dir(
        tmp_path: Path) -> None:
    """A command writes its state into $PIPEFARM_CHECKPOINT_DIR; the scheduler's warning signal
    reaches the worker and the command: the command is lost (no retry spent), the worker hands
    the rest back, and the next worker's attempt reads the command's own checkpoint."""
    log = str(tmp_path / "log")
    cmd = Command(argv=["sh", "-c", C.COUNT_SH, "count", log, "0.05"])
    spec = Spec(kind="cmd", payload=encode_command(cmd), max_lost=3, checkpoint_dir=True)
    store = _fs_run(tmp_path, spec, [encode_values({})], lease_s=30.0)
    a = FORK.Process(target=_worker, args=(store.layout.run, "a"), daemon=True)
    a.start()
    _wait_for_step(log, 4)
    shell_pid = int(Path(log).read_text().split()[2])
    for pid in (a.pid, shell_pid):  # the scheduler signals every process of the job
        os.kill(pid, signal.SIGTERM)
    a.join(20)
    assert a.exitcode == 0
    store.fold()
    store.export()  # the lost task is offered again (no lease to wait for)
    stats = work_loop(store.layout.run, "b", steal=False, idle_exit=5)
    assert stats.tasks == 1, stats
    store.fold()
    (row,) = store.tasks()
    assert row.state == "succeeded" and row.failures == 0
    assert [x.outcome for x in store.attempts(row.id)] == ["lost", "succeeded"]
    resumed(log, 20, 4)
    assert not (tmp_path / "run" / "checkpoints" / str(row.id)).exists(), "removed on success"
    store.close()

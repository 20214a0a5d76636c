"""Failure contract, "engine worker lost" on Ray: a worker slot's actor process SIGKILLed while its
pipefarm worker runs a task. The task's attempt becomes ``lost`` and the task runs again on
another slot; every other task succeeds exactly once; nothing of the actor is left behind."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import ray_lib
import tasks_lib as T

import pipefarm as pf

ray_address = ray_lib.ray_address  # the session's shared head (a fixture)


@pytest.fixture(autouse=True)
def _need_ray():
    ray_lib.require_ray()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def actor_of(pid: int) -> int | None:
    """The Ray actor process above ``pid`` (Ray names it ``ray::PipefarmSlot...``)."""
    p: int | None = pid
    while p and p > 1:
        if _cmdline(p).startswith("ray::PipefarmSlot"):
            return p
        p = T._ppid(p)
    return None


@pytest.mark.slow
def test_a_killed_actor_loses_its_task_which_runs_again(tmp_path, ray_address):
    pids, marks = tmp_path / "pids", tmp_path / "marks"
    pids.mkdir()
    marks.mkdir()
    killed: list[int] = []
    with pf.Run.create(tmp_path / "run") as run:
        victim = run.submit(T.pid_then_sleep, str(pids), 0, 30.0)
        ids = run.map(T.mark_and_double, [str(marks)] * 40, range(40), [0.05] * 40)

        def kill_the_victims_actor() -> None:
            task_pid = int(T.wait_until(lambda: (pids / "0").exists() and (pids / "0").read_text(),
                                        30, what="the victim task to start"))
            actor = actor_of(task_pid)
            assert actor is not None, f"no Ray actor above pid {task_pid}"
            os.kill(actor, signal.SIGKILL)
            killed.append(actor)

        killer = threading.Thread(target=kill_the_victims_actor, daemon=True)
        killer.start()
        summary = run.execute(workers=2, backend="ray", address=ray_address, progress=False)
        killer.join(5)
        assert killed, "the actor was not killed mid-run"
        assert summary.ok, summary
        assert run.result(victim) == ("second", 0)
        assert [a.outcome for a in run.attempts(victim)] == ["lost", "succeeded"]
        assert [run.result(t) for t in ids] == [2 * i for i in range(40)]
        for t in ids:
            assert [a.outcome for a in run.attempts(t)] == ["succeeded"], t
        assert all(len((marks / str(i)).read_text().split()) == 1 for i in range(40))
    # the killed actor's worker died with it (parent-death signal); the others exited at the end
    T.wait_until(lambda: not T.is_alive(killed[0]), 10, what="the killed actor to be gone")
    T.wait_until(lambda: not T.live_procs_with_cmdline(str(tmp_path / "run")), 10,
                 what="every pipefarm worker process to be gone")

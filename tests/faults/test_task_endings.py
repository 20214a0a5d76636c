"""How an attempt's end is recorded when it is not a plain return or exception.

Issue "Trust at the edges", items 1, 2, 3 and 8, on the local and sequential backends (the
array worker's side is in ``tests/cluster/test_array_edges.py``):

* a task killed by the signal that stops its worker (scheduler cancel, preemption, Ctrl-C) is a
  loss, never the task's failure;
* ``sys.exit`` in a task is the task's exception; a worker crashed by its Python task (segfault,
  abort, ``os._exit``) is a failed attempt naming the signal or exit code; SIGKILL from outside
  stays ``lost`` and says so;
* task processes start with default signal dispositions and an empty signal mask;
* any positive timeout works for command tasks, however long.

Everything here runs real worker processes, real commands and real signals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import endings_lib as E
import pytest

import pipefarm as pf

PF = [sys.executable, "-m", "pipefarm"]


def _pf(*args: object, cwd: Path, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*PF, *map(str, args)], cwd=cwd, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode in (0, 1), (args, proc.returncode, proc.stderr)
    return proc


def _results(d: Path) -> list[dict]:
    return json.loads(_pf("results", d / "run", "--format", "json", cwd=d).stdout)


def _outcomes(run: pf.Run, task: int) -> list[str]:
    return [a.outcome for a in run.attempts(task)]


# --- item 2: Python tasks that exit or crash their worker ----------------------------------------
@pytest.mark.parametrize("code", [0, 3, "msg"])
def test_sys_exit_is_the_tasks_exception_not_a_lost_worker(tmp_path, code):
    run = pf.Run.create(tmp_path / "run")
    task = run.submit_task(E.exit_with, (code,), retries=0, max_lost=3)
    ok = run.submit_task(E.signal_state)  # the worker keeps serving the run
    run.execute(workers=1, progress=False)
    assert _outcomes(run, task) == ["failed"]  # one attempt: not retried as a loss
    err = run.attempts(task)[0].error or ""
    assert "SystemExit" in err and str(code) in err
    assert "lost" not in err
    with pytest.raises(pf.TaskFailed) as info:
        run.result(task)
    assert isinstance(info.value.cause, SystemExit) and info.value.cause.code == code
    assert _outcomes(run, ok) == ["succeeded"]


def test_sys_exit_in_the_sequential_backend_is_a_failure(tmp_path):
    run = pf.Run.create(tmp_path / "run")
    task = run.submit_task(E.exit_with, (4,))
    run.execute(backend="sequential", progress=False)
    assert _outcomes(run, task) == ["failed"]
    assert "SystemExit: 4" in (run.attempts(task)[0].error or "")


def test_executor_reraises_systemexit_like_processpool():
    with pf.Executor(max_workers=1) as ex:
        fut = ex.submit(E.exit_with, 3)
        with pytest.raises(SystemExit) as info:
            fut.result(timeout=60)
        assert info.value.code == 3
        assert ex.submit(abs, -2).result(timeout=60) == 2  # the executor is still fine


@pytest.mark.parametrize(
    ("fn", "arg", "code", "words"),
    [
        (E.segfault, None, -signal.SIGSEGV, "SIGSEGV (segmentation fault)"),
        (E.abort, None, -signal.SIGABRT, "SIGABRT"),
        (E.hard_exit, 0, 0, "exit code 0"),
        (E.hard_exit, 7, 7, "exit code 7"),
    ],
)
def test_a_worker_crashed_by_its_python_task_is_a_failed_attempt(tmp_path, fn, arg, code, words):
    run = pf.Run.create(tmp_path / "run")
    task = run.submit_task(fn, (arg,), retries=1, max_lost=3)
    after = run.map(abs, [-1, -2, -3])
    summary = run.execute(workers=1, progress=False)
    # the task's own failure: retried by its retry budget (1), never as a loss
    assert _outcomes(run, task) == ["failed", "failed"], run.attempts(task)
    att = run.attempts(task)[-1]
    assert att.exit_code == code
    assert "crashed" in (att.error or "") and words in (att.error or "")
    assert run.tasks(ids=[task])[0].state == "failed"
    # the worker was replaced and the rest of the run went on
    assert [run.result(t) for t in after] == [1, 2, 3]
    assert summary.counts.get("succeeded") == 3


def test_sigkill_from_outside_stays_lost_and_says_so(tmp_path):
    run = pf.Run.create(tmp_path / "run")
    task = run.submit_task(E.kill_self, (signal.SIGKILL,), retries=5, max_lost=2)
    run.execute(workers=1, progress=False)
    # losses spend the lost budget (2), not the 5 retries
    assert _outcomes(run, task) == ["lost", "lost"]
    err = run.attempts(task)[0].error or ""
    assert "killed (SIGKILL; out of memory?)" in err
    assert run.attempts(task)[0].exit_code == -signal.SIGKILL


def test_failure_groups_name_the_signal_and_exit_code(tmp_path):
    run = pf.Run.create(tmp_path / "run")
    run.map(E.exit_with, [1, 2, 3])
    run.map(E.segfault, [None, None])
    run.map(E.hard_exit, [9])
    run.execute(workers=2, progress=False)
    run.close()
    groups = json.loads(_pf("failures", tmp_path / "run", "--json", cwd=tmp_path).stdout)
    by_count = sorted((g["count"], g["signature"]) for g in groups)
    assert [c for c, _ in by_count] == [1, 2, 3], groups
    assert "SystemExit" in by_count[2][1]
    assert "SIGSEGV" in by_count[1][1] and by_count[1][1].startswith("exit -")
    assert "exit code" in by_count[0][1] and "SIGSEGV" not in by_count[0][1]


# --- item 1: the signal that stops the run is not the tasks' failure ------------------------------
def _descendants(pid: int) -> list[int]:
    """``pid``'s descendants (by /proc parent links), deepest last."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _submit_sleepers(d: Path, n: int) -> None:
    # each task sleeps while the marker file says so: the rerun below finishes at once
    flag = d / "slow"
    flag.write_text("")
    script = f'echo started {{index}} >> {d}/started; if [ -e {flag} ]; then sleep 60; fi'
    proc = _pf("submit", d / "run", "--array", f"0-{n - 1}", "--shell", script, cwd=d)
    assert proc.returncode == 0, proc.stderr


def _start_run(d: Path, workers: int, **popen) -> subprocess.Popen:
    """``pipefarm run`` of ``d/run`` in the background."""
    return subprocess.Popen([*PF, "run", d / "run", "--workers", str(workers), "--no-progress"],
                            cwd=d, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def _wait_started(d: Path, n: int, deadline_s: float = 30) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        started = d / "started"
        if started.exists() and len(started.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError("tasks did not start")


def _assert_nothing_failed_and_rerun(d: Path, n: int) -> None:
    out = _pf("status", d / "run", "--json", cwd=d).stdout
    counts = json.loads(out)["counts"]
    assert not counts.get("failed"), counts
    groups = json.loads(_pf("failures", d / "run", "--json", cwd=d).stdout)
    assert groups == []
    (d / "slow").unlink()
    proc = _pf("run", d / "run", "--workers", "2", "--no-progress", cwd=d)
    assert proc.returncode == 0, proc.stderr
    counts = json.loads(_pf("status", d / "run", "--json", cwd=d).stdout)["counts"]
    assert counts.get("succeeded") == n, counts


def test_sigterm_to_every_process_of_a_local_run_loses_nothing(tmp_path):
    """As `scancel` of a job running `pipefarm run`: SIGTERM to the tasks first, then to the
    workers and the coordinator a moment later (the order a scheduler's kill loop may take)."""
    d = tmp_path
    _submit_sleepers(d, 2)
    proc = _start_run(d, 2)
    try:
        _wait_started(d, 2)
        procs = _descendants(proc.pid)
        sleepers = [p for p in procs if _comm(p) == "sleep"]
        assert len(sleepers) == 2, procs
        for p in sleepers:
            os.kill(p, signal.SIGTERM)
        time.sleep(0.05)
        for p in [proc.pid, *procs]:
            try:
                os.kill(p, signal.SIGTERM)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.communicate()
    _assert_nothing_failed_and_rerun(d, 2)


def test_ctrl_c_of_a_local_run_releases_running_commands(tmp_path):
    d = tmp_path
    _submit_sleepers(d, 2)
    proc = _start_run(d, 2, start_new_session=True)
    try:
        _wait_started(d, 2)
        # a terminal's Ctrl-C: SIGINT to the foreground process group
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.communicate()
    _assert_nothing_failed_and_rerun(d, 2)


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def test_a_command_killed_from_outside_while_its_worker_runs_on_is_a_failure(tmp_path):
    """Only the stop of the worker makes a signal death a loss: a task killed on its own
    (someone ran `kill` on it) failed, and says by which signal."""
    d = tmp_path
    _submit_sleepers(d, 1)
    proc = _start_run(d, 1)
    try:
        _wait_started(d, 1)
        (sleeper,) = [p for p in _descendants(proc.pid) if _comm(p) == "sleep"]
        os.kill(sleeper, signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.communicate()
    res = _results(d)
    assert [r["state"] for r in res] == ["failed"]


# --- item 3: task processes start with default signal dispositions --------------------------------
#: Signals 32 and 33 belong to the C library (glibc's thread cancellation and set*id
#: broadcast): no program can set or use them through it, and glibc installs its own handlers
#: at start, so an "ignore" inherited from whoever started pipefarm cannot matter (CI's
#: harness starts us with 32 ignored).
_LIBC_SIGNALS = (1 << 31) | (1 << 32)


def _sig_state(text: str) -> dict[str, int]:
    return {k: int(v, 16) & ~_LIBC_SIGNALS for k, v in (ln.split(":\t") for ln in text.splitlines()
                                                        if ln.startswith(("SigIgn", "SigBlk")))}


def test_command_tasks_start_with_default_signal_dispositions(tmp_path):
    d = tmp_path
    proc = _pf("submit", d / "run", "--", "grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status",
               cwd=d)
    assert proc.returncode == 0, proc.stderr
    # started as a shell's background job that also ignores USR1/USR2: what a job script does
    sh = (f"trap '' USR1 USR2; {' '.join(PF)} run {d / 'run'} --workers 1 --no-progress & wait")
    done = subprocess.run(["bash", "-c", sh], cwd=d, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = _pf("logs", d / "run", "1", cwd=d).stdout
    state = _sig_state(out)
    assert state == {"SigIgn": 0, "SigBlk": 0}, out


def test_python_tasks_do_not_inherit_ignored_usr1(tmp_path):
    run = pf.Run.create(tmp_path / "run")
    task = run.submit_task(E.signal_state)
    old = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        run.execute(workers=1, progress=False)
    finally:
        signal.signal(signal.SIGUSR1, old)
    state = run.result(task)
    # SIGPIPE: every Python interpreter ignores it itself (commands get it back on exec)
    assert not state["SigIgn"] & ~_LIBC_SIGNALS & ~(1 << (signal.SIGPIPE - 1)), state
    assert state["SigBlk"] == 0


# --- item 8: long timeouts ------------------------------------------------------------------------
@pytest.mark.parametrize("timeout", ["2147484", "1e8", "100000000000"])
def test_a_long_timeout_does_not_kill_command_tasks(tmp_path, timeout):
    d = tmp_path
    proc = _pf("submit", d / "run", "--timeout", timeout, "--", "echo", "hello", cwd=d)
    assert proc.returncode == 0, proc.stderr
    assert _pf("run", d / "run", "--no-progress", cwd=d).returncode == 0
    res = _results(d)
    assert [(r["state"], r["attempts"]) for r in res] == [("succeeded", 1)], res


def test_a_long_timeout_works_for_python_tasks_on_every_backend(tmp_path):
    for backend in ("local", "sequential"):
        run = pf.Run.create(tmp_path / backend)
        tasks = [run.submit_task(abs, (-5,), timeout=t) for t in (2147484, 1e8, 1e11)]
        run.execute(backend=backend, progress=False)
        assert [run.result(t) for t in tasks] == [5, 5, 5]


# --- found on the way: state a forked worker inherits ---------------------------------------------
def test_commands_start_in_workers_forked_by_a_process_that_ran_commands_itself(tmp_path):
    """The /dev/null fd kept for commands' stdin does not survive into forked workers (they
    close what they inherit): each worker opens its own, so its commands start."""
    first = pf.Run.create(tmp_path / "first")
    first.submit_cmd(["true"])
    first.execute(backend="sequential", progress=False)  # this process opens its /dev/null fd
    assert first.status()["succeeded"] == 1
    run = pf.Run.create(tmp_path / "run")
    ids = run.submit_cmd("exit 0", [{}] * 6)
    summary = run.execute(workers=2, progress=False)
    assert summary.ok, [run.attempts(t)[0].error for t in ids]

"""Habits users bring to ``pipefarm run`` and ``logs`` (issue 8): GNU parallel's ``--halt``,
honest exit messages on signals and cancels, GPU asks no worker can meet, ``logs`` mistakes,
and output caps that keep the head and the tail.

Every test runs real ``pipefarm`` processes on real commands and real signals.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PF = [sys.executable, "-m", "pipefarm"]
PY = sys.executable


def pf(*args: str | os.PathLike[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([*PF, *map(str, args)], cwd=cwd, stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=timeout)
    proc.stderr = proc.stderr.decode("utf-8", "replace")  # type: ignore[assignment]
    return proc


def pf_ok(*args: str | os.PathLike[str], cwd: Path) -> bytes:
    proc = pf(*args, cwd=cwd)
    assert proc.returncode == 0, (args, proc.returncode, proc.stderr)
    return proc.stdout


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipefarm: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def states(d: Path, run: str = "r") -> dict[int, tuple[str, int]]:
    import pipefarm as pfm

    with pfm.Run.open(d / run) as r:
        return {t.id: (t.state, t.attempts) for t in r.tasks()}


# --- halt ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_halt_soon_stops_handing_out_tasks_after_n_failures(tmp_path: Path) -> None:
    pf_ok("submit", "r", "--array", "0-39", "--", "sh", "-c", "sleep 0.05; exit 1", cwd=tmp_path)
    proc = pf("run", "r", "--no-progress", "-w", "1", "--halt", "soon,fail=3", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "halted: 3 task(s) failed (halt soon,fail=3)" in proc.stderr, proc.stderr
    assert "pipefarm run r" in proc.stderr  # how to resume
    st = states(tmp_path)
    failed = [t for t, (s, _) in st.items() if s == "failed"]
    ready = [t for t, (s, n) in st.items() if s == "ready" and n == 0]
    # one worker: the task running when the third failure was committed may finish too
    assert 3 <= len(failed) <= 5, st
    assert len(ready) == 40 - len(failed), st


@pytest.mark.slow
def test_halt_now_releases_running_tasks_without_spending_retries(tmp_path: Path) -> None:
    pf_ok("submit", "r", "--array", "0-1", "--", "sh", "-c", "sleep 60", cwd=tmp_path)
    pf_ok("submit", "r", "--", "sh", "-c", "sleep 0.5; exit 7", cwd=tmp_path)
    t0 = time.monotonic()
    proc = pf("run", "r", "--no-progress", "-w", "3", "--halt", "now,fail=1", cwd=tmp_path)
    assert time.monotonic() - t0 < 30, "halt now waited for the running tasks"
    assert proc.returncode == 3, proc.stderr
    assert "halted: 1 task(s) failed (halt now,fail=1)" in proc.stderr
    st = states(tmp_path)
    assert st[3][0] == "failed"
    for t in (1, 2):  # released: ready again, no failure charged
        assert st[t][0] == "ready", st


@pytest.mark.slow
def test_halt_percent_needs_ten_ended_tasks(tmp_path: Path) -> None:
    # task 0 fails, 1-19 succeed: 1 of 1 ended is 100%, but fail=50% is judged from 10 ended
    # tasks on, where it is 10%: no halt
    pf_ok("submit", "r", "--array", "0-19", "--", "sh", "-c", "exit $(( {index} == 0 ))",
          cwd=tmp_path)
    proc = pf("run", "r", "--no-progress", "-w", "1", "--halt", "soon,fail=50%", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "halted" not in proc.stderr
    # every task fails: halted once 10 have ended
    pf_ok("submit", "all", "--array", "0-99", "--", "false", cwd=tmp_path)
    proc = pf("run", "all", "--no-progress", "-w", "1", "--halt", "soon,fail=50%", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "(halt soon,fail=50%)" in proc.stderr
    failed = sum(1 for s, _ in states(tmp_path, "all").values() if s == "failed")
    assert 10 <= failed < 100


@pytest.mark.parametrize("spec", ["later,fail=1", "soon", "soon,fail=0", "now,fail=x",
                                  "soon,fail=150%", "soon,done=3"])
@pytest.mark.slow
def test_bad_halt_is_one_line(tmp_path: Path, spec: str) -> None:
    pf_ok("submit", "r", "--", "true", cwd=tmp_path)
    line = one_error_line(pf("run", "r", "--no-progress", "--halt", spec, cwd=tmp_path))
    assert "--halt" in line
    assert states(tmp_path) == {1: ("ready", 0)}


def test_halt_from_python(tmp_path: Path) -> None:
    import pipefarm as pfm
    from pipefarm.execute.template import Command

    with pfm.Run.create(tmp_path / "r") as run:
        run.submit_cmd(Command(argv=["sh", "-c", "sleep 0.05; exit 1"]), [{}] * 30)
        summary = run.execute(workers=1, progress=False, halt="soon,fail=2")
        assert summary.halted is not None
        assert summary.halted.endswith("task(s) failed (halt soon,fail=2)")
        assert str(summary).startswith("halted: ")
        assert 2 <= summary.counts["failed"] <= 4
        assert summary.counts["ready"] == 30 - summary.counts["failed"]
        with pytest.raises(ValueError, match="soon,fail=N"):
            run.execute(progress=False, halt="sometime")
        with pytest.raises(ValueError, match="not sequential"):
            run.execute(backend="sequential", progress=False, halt="soon,fail=1")
        # a backend object given: the policy applies to it too
        from pipefarm.backends.local import LocalBackend

        before = summary.counts["failed"]
        again = run.execute(backend=LocalBackend(1), progress=False, halt="soon,fail=1")
        assert again.halted is not None and again.counts["failed"] - before <= 3
        assert again.counts["ready"] > 0


# --- honest messages -------------------------------------------------------------------------------
def _run_then_signal(d: Path, sig: int) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([*PF, "run", "r", "--no-progress", "-w", "2"], cwd=d,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if sum(1 for s, _ in states(d).values() if s == "running") == 2:
            break
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("tasks never started")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err.decode())


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
@pytest.mark.slow
def test_signal_says_interrupted_and_how_to_resume(tmp_path: Path, sig: int, code: int) -> None:
    pf_ok("submit", "r", "--array", "0-7", "--", "sleep", "60", cwd=tmp_path)
    proc = _run_then_signal(tmp_path, sig)
    assert proc.returncode == code, proc.stderr
    assert "interrupted; resume with: pipefarm run r" in proc.stderr
    assert "did not succeed" not in proc.stderr
    assert pf_ok("failures", "r", cwd=tmp_path).decode().strip() == "no failed tasks"
    assert all(s == "ready" for s, _ in states(tmp_path).values())


@pytest.mark.slow
def test_cancelled_tasks_are_called_cancelled(tmp_path: Path) -> None:
    pf_ok("submit", "r", "--array", "0-9", "--", "true", cwd=tmp_path)
    said = pf_ok("cancel", "r", "--ids", "1-4", cwd=tmp_path).decode()
    assert said == "4 task(s) cancelled; to run them after all: pipefarm retry r --all\n"
    proc = pf("run", "r", "--no-progress", "-w", "1", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "4 task(s) cancelled" in proc.stderr
    assert "did not succeed" not in proc.stderr
    # what the message says works
    pf_ok("retry", "r", "--all", cwd=tmp_path)
    pf_ok("run", "r", "--no-progress", "-w", "1", cwd=tmp_path)
    assert {s for s, _ in states(tmp_path).values()} == {"succeeded"}


# --- GPUs no worker has ----------------------------------------------------------------------------
@pytest.mark.slow
def test_more_gpus_than_available_refused_before_running(tmp_path: Path) -> None:
    pf_ok("submit", "r", "--", "true", cwd=tmp_path)
    pf_ok("submit", "r", "--gpus", "2", "--array", "0-1", "--", "true", cwd=tmp_path)
    line = one_error_line(pf("run", "r", "--no-progress", "--gpus-available", "0",
                             cwd=tmp_path))
    assert "task(s) 2, 3" in line and "2 GPU(s)" in line and "1 GPU(s) available (0)" in line
    assert states(tmp_path) == {1: ("ready", 0), 2: ("ready", 0), 3: ("ready", 0)}
    # enough GPUs: it runs
    pf_ok("run", "r", "--no-progress", "--gpus-available", "0,1", cwd=tmp_path)
    assert {s for s, _ in states(tmp_path).values()} == {"succeeded"}


# --- logs mistakes ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_logs_attempt_that_does_not_exist(tmp_path: Path) -> None:
    pf_ok("submit", "r", "--retries", "2", "--", "sh", "-c", "echo try; exit 1", cwd=tmp_path)
    assert pf("run", "r", "--no-progress", cwd=tmp_path).returncode == 1
    assert pf_ok("logs", "r", "1", "--attempt", "3", cwd=tmp_path) == b"try\n"
    line = one_error_line(pf("logs", "r", "1", "--attempt", "5", cwd=tmp_path))
    assert "attempts 1-3" in line and "no attempt 5" in line


@pytest.mark.slow
def test_logs_when_the_log_file_was_deleted(tmp_path: Path) -> None:
    pf_ok("submit", "r", "--", "echo", "hello", cwd=tmp_path)
    pf_ok("run", "r", "--no-progress", cwd=tmp_path)
    assert pf_ok("logs", "r", "1", cwd=tmp_path) == b"hello\n"
    for f in (tmp_path / "r" / "logs").glob("*.out"):
        f.unlink()
    line = one_error_line(pf("logs", "r", "1", cwd=tmp_path))
    assert "cannot be read" in line


# --- output cap: head and tail ---------------------------------------------------------------------
@pytest.mark.slow
def test_output_cap_keeps_head_and_tail_with_a_marker(tmp_path: Path) -> None:
    code = ("import sys\nfor i in range(100000): print('line', i)\n"
            "print('FATAL: the error at the end', file=sys.stderr)\n"
            "print('last stdout line'); sys.exit(3)")
    pf_ok("submit", "r", "--output-cap", "4096", "--", PY, "-c", code, cwd=tmp_path)
    assert pf("run", "r", "--no-progress", cwd=tmp_path).returncode == 1
    out = pf_ok("logs", "r", "1", cwd=tmp_path)
    assert out.startswith(b"line 0\nline 1\n")
    assert out.endswith(b"line 99999\nlast stdout line\n")  # the end survives the cap
    printed = b"".join(b"line %d\n" % i for i in range(100000)) + b"last stdout line\n"
    head = printed[:2048]  # half the cap; it ends inside a line: the marker starts a new one
    assert not head.endswith(b"\n")
    marker = b"\n[pipefarm: 1,084,844 bytes cut]\n"
    tail = printed[-(4096 - 2048 - len(marker)):]
    assert out == head + marker + tail
    assert len(out) == 4096 and len(head) + 1_084_844 + len(tail) == len(printed)
    # never more than the cap on disk
    assert sum(f.stat().st_size for f in (tmp_path / "r" / "logs").glob("*.out")) <= 4096
    assert pf_ok("logs", "r", "1", "--stderr", cwd=tmp_path) == b"FATAL: the error at the end\n"


# --- logs of Python tasks --------------------------------------------------------------------------
@pytest.mark.slow
def test_python_tasks_output_is_captured_per_attempt(tmp_path: Path) -> None:
    (tmp_path / "tasks_habits.py").write_text(
        "import os, sys\n"
        "def noisy(i):\n"
        "    print('out of', i)\n"
        "    print('err of', i, file=sys.stderr)\n"
        "    if i % 7 == 0:\n"
        "        os.write(1, b'raw fd write %d\\n' % i)  # below Python's buffers too\n"
        "    if i == 5:\n"
        "        raise ValueError('five')\n"
        "    return i\n"
        "def quiet(i):\n"
        "    return i\n")
    code = ("import sys; sys.path.insert(0, '.'); import pipefarm as pf, tasks_habits as t\n"
            "from pipefarm.execute.template import Command\n"
            "r = pf.Run.create('r')\n"
            "r.map(t.noisy, range(40), retries=1)\n"
            "r.submit_cmd(Command(argv=['echo', 'a command {index}']), [{'index': '1'}])\n"
            "r.map(t.quiet, range(3))\n"
            "r.map(t.noisy, range(40, 60))\n"
            "r.execute(workers=2, progress=False)\n")
    subprocess.run([PY, "-c", code], cwd=tmp_path, check=True, timeout=120)
    for tid, i in [(1, 0), (2, 1), (8, 7), (40, 39), (45, 40), (54, 49), (64, 59)]:
        out = pf_ok("logs", "r", str(tid), cwd=tmp_path)
        want = f"out of {i}\n" + (f"raw fd write {i}\n" if i % 7 == 0 else "")
        assert sorted(out.decode().splitlines()) == sorted(want.splitlines()), (tid, out)
        assert pf_ok("logs", "r", str(tid), "--stderr", cwd=tmp_path) == f"err of {i}\n".encode()
    assert pf_ok("logs", "r", "41", cwd=tmp_path) == b"a command 1\n"
    assert pf_ok("logs", "r", "42", cwd=tmp_path) == b""  # quiet: printed nothing
    # the failing task printed on both attempts; each attempt has its own output
    for attempt in (1, 2):
        assert pf_ok("logs", "r", "6", "--attempt", str(attempt), cwd=tmp_path) == b"out of 5\n"
    err = pf_ok("logs", "r", "6", "--stderr", cwd=tmp_path)
    assert err == b"err of 5\n"
    # two files per worker, no unattributed per-worker python log
    names = sorted(p.name for p in (tmp_path / "r" / "logs").iterdir())
    assert names and all(n.endswith((".out", ".err")) for n in names), names


# --- logs --follow ---------------------------------------------------------------------------------
def _follow_while_running(d: Path, run: str, task: int, go: Path) -> None:
    """Start `pipefarm run` and `logs --follow`; the task prints "first", waits for ``go``,
    prints "second" and ends: the follower must show "first" before ``go`` exists."""
    runner = subprocess.Popen([*PF, "run", run, "--no-progress", "-w", "1"], cwd=d,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    follower = subprocess.Popen([*PF, "logs", run, str(task), "--follow"], cwd=d,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    try:
        assert follower.stdout is not None
        first = follower.stdout.readline()  # blocks until the follower shows it
        assert first == b"first\n"
        assert not go.exists() and runner.poll() is None  # shown while the task runs
        go.touch()
        rest, err = follower.communicate(timeout=60)
        assert follower.returncode == 0, err
        assert rest == b"second\n" and err == b""
        assert runner.wait(timeout=60) == 0
    finally:
        for p in (runner, follower):
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.slow
def test_logs_follow_a_command_task(tmp_path: Path) -> None:
    go = tmp_path / "go"
    pf_ok("submit", "r", "--", "sh", "-c",
          f"echo first; while [ ! -e {go} ]; do sleep 0.05; done; echo second", cwd=tmp_path)
    _follow_while_running(tmp_path, "r", 1, go)


@pytest.mark.slow
def test_logs_follow_a_python_task(tmp_path: Path) -> None:
    go = tmp_path / "go"
    (tmp_path / "tasks_follow.py").write_text(
        "import os, time\n"
        "def waits(go):\n"
        "    print('first')\n"
        "    while not os.path.exists(go):\n"
        "        time.sleep(0.05)\n"
        "    print('second')\n")
    subprocess.run([PY, "-c", "import sys; sys.path.insert(0, '.'); import pipefarm as pf, "
                    f"tasks_follow as t; pf.Run.create('r').map(t.waits, [{str(go)!r}])"],
                   cwd=tmp_path, check=True, timeout=60)
    _follow_while_running(tmp_path, "r", 1, go)


@pytest.mark.slow
def test_logs_follow_ctrl_c_is_quiet(tmp_path: Path) -> None:
    pf_ok("submit", "r", "--", "echo", "never run", cwd=tmp_path)
    follower = subprocess.Popen([*PF, "logs", "r", "1", "--follow"], cwd=tmp_path,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    time.sleep(1.5)  # waiting for the task to start
    assert follower.poll() is None
    follower.send_signal(signal.SIGINT)
    out, err = follower.communicate(timeout=30)
    assert follower.returncode == 0 and out == b"" and err == b""


def test_logs_follow_of_an_ended_task_prints_it_and_ends(tmp_path: Path) -> None:
    pf_ok("submit", "r", "--", "echo", "done already", cwd=tmp_path)
    pf_ok("run", "r", "--no-progress", cwd=tmp_path)
    assert pf_ok("logs", "r", "1", "-f", cwd=tmp_path) == b"done already\n"

"""Command tasks (``pipefarm.execute.cmd``): templates, quoting, exit codes, timeouts, cleanup.

Every test runs real commands in real processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pipefarm.execute.cmd import EXIT_CANNOT_RUN, EXIT_NOT_FOUND, CmdResult, run_command
from pipefarm.execute.output import OutputSink, read_output
from pipefarm.execute.template import (
    Command,
    TemplateError,
    decode_command,
    decode_values,
    encode_command,
    encode_values,
    placeholders,
    render,
)

HOSTILE = [
    "$(rm -rf ~)",
    "`rm -rf ~`",
    "a; rm -rf ~",
    "it's",
    '"double" and \'single\' quotes',
    "line one\nline two\n",
    "  leading and trailing spaces  ",
    "tab\there",
    "*",
    "~",
    "$HOME ${HOME}",
    "back\\slash",
    "-n",
    "--help",
    "",
    "{index}",
    "héllo wörld ✓",
    "a|b&c>d<e",
    "\x01\x7f",
]


@pytest.fixture
def sink(tmp_path: Path) -> OutputSink:
    with OutputSink(tmp_path / "logs", "w1") as s:
        yield s


def run(cmd: Command, values: dict | None = None, sink: OutputSink | None = None, **kw) -> CmdResult:
    kw.setdefault("timeout", 30)
    return run_command(cmd, values or {}, sink=sink, task=kw.pop("task", 1), attempt=1, **kw)


def out(sink: OutputSink, res: CmdResult, stream: str = "stdout") -> bytes:
    return read_output(sink.log_dir, res.output, stream)


def live_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies (read from /proc)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            pids.append(int(name))
    return pids


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return line.split()[1] not in ("Z", "X")
    except OSError:
        return False
    return False


def wait_dead(pids: list[int], pgid: int | None = None, within: float = 5.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if not any(alive(p) for p in pids) and (pgid is None or not live_members(pgid)):
            return True
        time.sleep(0.02)
    return False


# -- templates -------------------------------------------------------------------------------


def test_placeholders_argv_shell_and_cwd():
    cmd = Command(argv=["prog", "{index}", "--in={line}.txt", "{0}-{1}", "{{literal}}"],
                  cwd="/tmp/{alpha}")
    assert placeholders(cmd) == {"index", "line", "0", "1", "alpha"}
    assert placeholders(Command(shell="echo {a} {{b}} {c:05d}")) == {"a", "c"}
    assert placeholders(Command(argv=["true"])) == set()


def test_render_argv_substitutes_each_element():
    cmd = Command(argv=["echo", "{a}", "x{b}y", "{{a}}", "{n:04d}"])
    assert render(cmd, {"a": "1 2", "b": "; ls", "n": "7"}) == ["echo", "1 2", "x; lsy", "{a}", "0007"]


def test_render_shell_quotes_values():
    cmd = Command(shell="echo {a} > {b}")
    argv = render(cmd, {"a": "it's $(x)", "b": "out file"})
    assert argv == ["/bin/sh", "-c", "echo 'it'\"'\"'s $(x)' > 'out file'"]


def test_missing_placeholder_is_a_clear_keyerror():
    cmd = Command(argv=["prog", "{index}", "{sample}"])
    with pytest.raises(TemplateError) as info:
        render(cmd, {"index": "1"})
    assert isinstance(info.value, KeyError)
    msg = str(info.value)
    assert "{sample}" in msg and "{index}" in msg and not msg.startswith("'")


# issue 8: brace text that is not {name}, {name:spec}, {N} or {} is literal (it was refused)
@pytest.mark.parametrize(
    ("text", "names", "rendered"),
    [("{", set(), "{"), ("}", set(), "}"), ("{a!r}", set(), "{a!r}"),
     ("{a:{b}}", {"b"}, "{a:B}"), ("{}", {""}, "V"), ("${a}", set(), "${a}"),
     ("{{a}}", set(), "{a}"), ("{ echo; }", set(), "{ echo; }")],
)
def test_non_placeholder_brace_text_is_literal(text, names, rendered):
    cmd = Command(argv=["x", text])
    assert placeholders(cmd) == names
    assert render(cmd, {"b": "B"} if names == {"b"} else {"v": "V"})[1] == rendered


def test_command_needs_exactly_one_of_argv_and_shell():
    with pytest.raises(ValueError):
        Command()
    with pytest.raises(ValueError):
        Command(argv=["x"], shell="x")
    with pytest.raises(ValueError):
        Command(argv=[])


def test_encode_roundtrip():
    cmd = Command(argv=["a", "{b}"], cwd="/x", env={"K": "V"}, output_cap=10, output_per_task=True)
    assert decode_command(encode_command(cmd)) == cmd
    shell = Command(shell="echo {x}")
    assert decode_command(encode_command(shell)) == shell
    vals = {"index": "3", "line": "a b", "raw": b"\xff\xfe name".decode("utf-8", "surrogateescape")}
    assert decode_values(encode_values(vals)) == vals
    assert decode_values(encode_values({"a": "b"})) == {"a": "b"}
    assert decode_values(None) == {}


# -- values arrive byte-exact ----------------------------------------------------------------


def test_hostile_values_argv_mode_one_element_byte_exact(sink, tmp_path):
    home_marker = tmp_path / "still-here"
    home_marker.write_text("x")
    printf = Command(argv=["printf", "%s", "{v}"])
    count = Command(argv=["sh", "-c", 'printf %s "$#"', "sh", "{v}"])
    for i, v in enumerate(HOSTILE):
        res = run(printf, {"v": v}, sink, task=i)
        assert res.exit_code == 0, res
        assert out(sink, res) == v.encode(), v
        res = run(count, {"v": v}, sink, task=i)
        assert out(sink, res) == b"1", v  # exactly one argv element, never split
    assert home_marker.exists()


def test_hostile_values_shell_mode_verbatim(sink, tmp_path):
    home_marker = tmp_path / "still-here"
    home_marker.write_text("x")
    printf = Command(shell="printf %s {v}")
    count = Command(shell="set -- {v}; printf %s $#")
    for i, v in enumerate(HOSTILE):
        res = run(printf, {"v": v}, sink, task=i)
        assert res.exit_code == 0, (v, res)
        assert out(sink, res) == v.encode(), v
        res = run(count, {"v": v}, sink, task=i)
        assert out(sink, res) == b"1", v
    assert home_marker.exists()


def test_non_utf8_value_reaches_argv_byte_exact(sink):
    raw = b"caf\xe9 \xff\x80"
    value = raw.decode("utf-8", "surrogateescape")
    values = decode_values(encode_values({"v": value}))  # as stored in the run
    res = run(Command(argv=["printf", "%s", "{v}"]), values, sink)
    assert out(sink, res) == raw


# -- outcomes --------------------------------------------------------------------------------


def test_success(sink):
    res = run(Command(argv=["true"]), sink=sink)
    assert res.ok and res.exit_code == 0 and not res.timed_out
    assert res.stderr_tail == "" and res.note is None and res.output is None
    assert res.started_at <= res.ended_at


def test_nonzero_exit_with_stderr_tail(sink):
    script = "for i in $(seq 1 100); do echo out$i; echo err$i >&2; done; exit 3"
    res = run(Command(shell=script), sink=sink)
    assert res.exit_code == 3 and not res.ok and not res.timed_out
    lines = res.stderr_tail.splitlines()
    assert lines == [f"err{i}" for i in range(81, 101)]
    assert out(sink, res, "stderr").count(b"\n") == 100


def test_stderr_tail_bounded_in_bytes(sink):
    script = "head -c 100000 /dev/zero | tr '\\0' x >&2; exit 1"
    res = run(Command(shell=script), sink=sink)
    assert res.exit_code == 1
    assert 0 < len(res.stderr_tail.encode()) <= 2048


def test_killed_by_signal_is_negative(sink):
    res = run(Command(shell="kill -9 $$"), sink=sink)
    assert res.exit_code == -signal.SIGKILL and not res.ok


def test_program_not_found_is_127(sink):
    res = run(Command(argv=["pipefarm-no-such-program", "x"]), sink=sink)
    assert res.exit_code == EXIT_NOT_FOUND and not res.ok
    assert "pipefarm-no-such-program" in res.stderr_tail and "not found" in res.stderr_tail
    res = run(Command(argv=["/nonexistent/dir/prog"]), sink=sink)
    assert res.exit_code == EXIT_NOT_FOUND
    # through the shell: the shell's own 127
    res = run(Command(shell="pipefarm-no-such-program"), sink=sink)
    assert res.exit_code == 127 and "not found" in res.stderr_tail


def test_not_executable_and_bad_cwd_are_126(sink, tmp_path):
    f = tmp_path / "script.sh"
    f.write_text("#!/bin/sh\necho hi\n")
    f.chmod(0o644)
    res = run(Command(argv=[str(f)]), sink=sink)
    assert res.exit_code == EXIT_CANNOT_RUN and "Permission denied" in res.stderr_tail
    res = run(Command(argv=["true"], cwd=str(tmp_path / "missing-{index}")), {"index": "4"}, sink)
    assert res.exit_code == EXIT_CANNOT_RUN and "missing-4" in res.stderr_tail


def test_template_error_at_run_time_is_a_failure_not_an_exception(sink):
    res = run(Command(argv=["echo", "{nope}"]), {"index": "1"}, sink)
    assert res.exit_code is None and not res.ok and "{nope}" in res.stderr_tail


def test_nul_in_value_is_a_failure(sink):
    res = run(Command(argv=["echo", "{v}"]), {"v": "a\0b"}, sink)
    assert res.exit_code == EXIT_CANNOT_RUN and not res.ok


def test_environment_cwd_and_stdin(sink, tmp_path, monkeypatch):
    monkeypatch.setenv("FROM_WORKER", "w")
    (tmp_path / "d7").mkdir()
    cmd = Command(
        shell='printf %s "$FROM_WORKER:$FOO:$BAR:$PIPEFARM_TASK_ID:$PIPEFARM_ATTEMPT:$(pwd)"; cat',
        env={"FOO": "foo", "BAR": "from-cmd"},
        cwd=str(tmp_path / "d{index}"),
    )
    res = run_command(cmd, {"index": "7"}, timeout=10, sink=sink, task=42, attempt=3,
                      extra_env={"BAR": "bar"})
    assert res.ok, res
    assert out(sink, res) == f"w:foo:bar:42:3:{tmp_path / 'd7'}".encode()


# -- stopping ----------------------------------------------------------------------------------


def test_timeout_kills_the_whole_group(sink):
    cmd = Command(shell="sleep 1000 & echo $!; echo $$; sleep 1000")
    t = time.monotonic()
    res = run(cmd, sink=sink, timeout=0.3)
    took = time.monotonic() - t
    assert res.timed_out and not res.ok and took < 2.0
    assert res.exit_code == -signal.SIGTERM
    assert "timed out" in res.note
    bg, leader = (int(x) for x in out(sink, res).split())
    # everything is dead at return; zombies waiting for init to reap them do not count
    assert not alive(bg) and not alive(leader)
    assert live_members(leader) == []


@pytest.mark.slow
def test_timeout_sigkill_when_sigterm_is_ignored(sink):
    cmd = Command(shell="trap '' TERM; sleep 1000 & echo $!; echo $$; sleep 1000")
    t = time.monotonic()
    res = run(cmd, sink=sink, timeout=0.2, kill_grace=0.3)
    assert res.timed_out and res.exit_code == -signal.SIGKILL
    assert time.monotonic() - t < 2.0
    bg, leader = (int(x) for x in out(sink, res).split())
    assert not alive(bg) and live_members(leader) == []


def test_background_leftovers_die_with_the_task(sink):
    # one keeps the output pipe open, one does not: both end with the task, quickly
    cmd = Command(shell="echo hi; sleep 1000 & sleep 1000 >/dev/null 2>&1 & echo $! >&2")
    t = time.monotonic()
    res = run(cmd, sink=sink)
    assert time.monotonic() - t < 2.0
    assert res.exit_code == 0 and not res.timed_out
    assert out(sink, res) == b"hi\n"
    assert "left processes" in res.note
    detached = int(out(sink, res, "stderr"))
    assert wait_dead([detached], within=1.0)


def test_abort_event_stops_the_command(sink):
    abort = threading.Event()
    threading.Timer(0.2, abort.set).start()
    t = time.monotonic()
    res = run(Command(shell="echo $$; sleep 1000"), sink=sink, abort=abort)
    assert time.monotonic() - t < 2.0
    assert not res.ok and not res.timed_out and "aborted" in res.note
    assert live_members(int(out(sink, res))) == []


def test_commands_run_concurrently_from_threads(sink):
    results: list[CmdResult] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        r = run_command(Command(shell="sleep 0.3; printf %s {i}"), {"i": str(i)}, timeout=10,
                        sink=sink, task=i, attempt=1)
        with lock:
            results.append(r)

    t = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert time.monotonic() - t < 1.5  # in parallel, not one after another
    assert sorted(out(sink, r) for r in results) == [str(i).encode() for i in range(6)]


def test_spawn_rate_is_not_pathological(sink):
    cmd = Command(argv=["true"])
    run(cmd, sink=sink)
    t = time.perf_counter()
    for i in range(100):
        assert run(cmd, sink=sink, task=i).ok
    assert time.perf_counter() - t < 5.0  # ~0.1 s on a laptop; see the report for real numbers


# -- children do not outlive their worker ---------------------------------------------------

WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from pipefarm.execute.cmd import run_command
    from pipefarm.execute.template import Command
    from pipefarm.execute.output import OutputSink
    sink = OutputSink(Path(sys.argv[1]), "victim")
    cmd = Command(shell="echo $$ > " + sys.argv[2] + ".tmp; sleep 1000 & echo $! >> "
                  + sys.argv[2] + ".tmp; mv " + sys.argv[2] + ".tmp " + sys.argv[2]
                  + "; sleep 1000")
    if len(sys.argv) > 3:
        cmd = Command(argv=["sh", "-c", "echo $$ > " + sys.argv[2] + ".tmp; mv "
                            + sys.argv[2] + ".tmp " + sys.argv[2] + "; exec sleep 1000"])
    run_command(cmd, {}, timeout=None, sink=sink, task=1, attempt=1)
    """
)


def start_victim(tmp_path: Path, mode: str, direct: bool = False):
    pids = tmp_path / "pids"
    env = dict(os.environ, PIPEFARM_CHILD_GUARD=mode)
    args = [sys.executable, "-c", WORKER, str(tmp_path / "logs"), str(pids)]
    if direct:
        args.append("direct")
    worker = subprocess.Popen(args, env=env)
    end = time.monotonic() + 10
    while not pids.exists():
        assert time.monotonic() < end, "the worker did not start its command"
        assert worker.poll() is None, "the worker died"
        time.sleep(0.01)
    # the worker registers the task with its guardian microseconds after the fork; the task
    # needs milliseconds to write the file, but a loaded machine can reorder anything
    time.sleep(0.05)
    return worker, [int(x) for x in pids.read_text().split()]


@pytest.fixture
def reap_leftovers():
    """Kills the task groups a failing test would otherwise leave behind."""
    groups: list[int] = []
    yield groups
    for g in groups:
        try:
            os.killpg(g, signal.SIGKILL)
        except OSError:
            pass


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
@pytest.mark.slow
def test_worker_death_kills_the_task_group(tmp_path, how, reap_leftovers):
    worker, pids = start_victim(tmp_path, "guardian")
    reap_leftovers.append(pids[0])
    assert all(alive(p) for p in pids)
    worker.send_signal(how)
    worker.wait(5)
    assert wait_dead(pids, pgid=pids[0], within=5.0), "task processes outlived their worker"


def test_keyboard_interrupt_in_worker_kills_the_task_group(tmp_path, reap_leftovers):
    worker, pids = start_victim(tmp_path, "none")  # no guardian: run_command itself cleans up
    reap_leftovers.append(pids[0])
    worker.send_signal(signal.SIGINT)
    worker.wait(5)
    assert wait_dead(pids, pgid=pids[0], within=3.0)


def test_pdeathsig_mode_kills_the_direct_child(tmp_path, reap_leftovers):
    worker, pids = start_victim(tmp_path, "pdeathsig", direct=True)
    reap_leftovers.append(pids[0])
    worker.kill()
    worker.wait(5)
    assert wait_dead(pids, within=3.0)


def test_shell_variable_reaches_the_shell(sink):
    # issue 8: ${HOME} is the shell's (it used to be refused); ${{HOME}} still works
    for line in ("printf %s ${HOME}", "printf %s ${{HOME}}"):
        res = run(Command(shell=line), sink=sink)
        assert out(sink, res) == os.environ["HOME"].encode()


@pytest.mark.slow
def test_pipe_held_outside_the_group_does_not_hang_the_worker(sink):
    # a daemon that left the task's session keeps the output pipe open; give up on it
    cmd = Command(shell="setsid sh -c 'echo $$ >&2; exec sleep 30' & sleep 0.2; echo done")
    t = time.monotonic()
    res = run(cmd, sink=sink, kill_grace=0.2)
    try:
        assert time.monotonic() - t < 3.0
        assert res.exit_code == 0 and out(sink, res) == b"done\n"
        assert "outside the task" in res.note
    finally:
        os.kill(int(out(sink, res, "stderr")), signal.SIGKILL)

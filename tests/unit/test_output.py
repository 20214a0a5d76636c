"""Command output (``pipefarm.execute.output``): few files per worker, caps, byte-exact reads."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pipefarm.execute.cmd import run_command
from pipefarm.execute.output import OutputSink, OutputUnavailable, read_output
from pipefarm.execute.template import Command

MiB = 1 << 20


def run(cmd: Command, sink: OutputSink, values: dict | None = None, task: int = 1):
    return run_command(cmd, values or {}, timeout=60, sink=sink, task=task, attempt=1)


def test_output_capped_while_running_with_a_note(tmp_path):
    logs = tmp_path / "logs"
    with OutputSink(logs, "w1") as sink:
        cmd = Command(shell="head -c 5000000 /dev/zero; head -c 3000000 /dev/zero >&2")
        res = run(cmd, sink)
        assert res.exit_code == 0
        assert "stdout cut at 1048576 of 5000000 bytes" in res.note
        assert "stderr cut at 1048576 of 3000000 bytes" in res.note
        # the head and the tail are kept (errors come last), with a marker where bytes were cut
        for stream, total in (("stdout", 5_000_000), ("stderr", 3_000_000)):
            data = read_output(logs, res.output, stream)
            assert len(data) == MiB
            head, marker, tail = re.fullmatch(rb"(\0+)(\n\[pipefarm: [\d,]+ bytes cut\]\n)(\0+)",
                                              data).groups()
            assert len(head) == MiB // 2
            cut = int(re.search(rb"[\d,]+", marker).group().replace(b",", b""))
            assert len(head) + cut + len(tail) == total, stream
    # nothing beyond the cap ever reached the disk
    assert (logs / "w1.out").stat().st_size == MiB
    assert (logs / "w1.err").stat().st_size == MiB


def test_small_cap_and_zero_cap(tmp_path):
    with OutputSink(tmp_path, "w1") as sink:
        res = run(Command(shell="seq 1 1000", output_cap=10), sink)
        assert read_output(tmp_path, res.output, "stdout") == b"1\n2\n3\n4\n5\n"
        assert res.note == "stdout cut at 10 of 3893 bytes"
        res = run(Command(shell="echo hello; echo err >&2; exit 2", output_cap=0), sink)
        assert res.output is None and res.exit_code == 2
        assert res.stderr_tail == "err"  # the tail comes from what was printed, not what was kept
        assert "stdout cut at 0 of 6 bytes" in res.note
    assert (tmp_path / "w1.out").stat().st_size == 10
    assert not (tmp_path / "w1.err").exists()


def test_binary_output_byte_exact(tmp_path):
    blob = bytes(range(256)) * 64 + os.urandom(300_000) + b"\0\r\n\r\x00"
    src = tmp_path / "blob.bin"
    src.write_bytes(blob)
    with OutputSink(tmp_path / "logs", "w1") as sink:
        res = run(Command(argv=["sh", "-c", 'cat "$1"; cat "$1" >&2', "sh", str(src)]), sink)
        assert res.ok
        assert read_output(tmp_path, res.output, "stdout") == blob  # via the run directory
        assert read_output(tmp_path / "logs", res.output, "stderr") == blob


@pytest.mark.slow
def test_thousand_commands_two_files_each_read_back_exactly(tmp_path):
    logs = tmp_path / "logs"
    script = (
        'i=$1; if [ $((i % 7)) -ne 0 ]; then printf "out %s\\n" "$i"; fi; '
        'if [ $((i % 3)) -eq 0 ]; then printf "err %s" "$i" >&2; fi; '
        'if [ $((i % 100)) -eq 0 ]; then head -c 100000 /dev/zero; fi'
    )
    cmd = Command(argv=["sh", "-c", script, "sh", "{index}"])
    refs = {}
    with OutputSink(logs, "w1") as sink:
        for i in range(1000):
            res = run(cmd, sink, {"index": str(i)}, task=i)
            assert res.ok, res
            refs[i] = res.output
    assert sorted(os.listdir(logs)) == ["w1.err", "w1.out"]
    for i, ref in refs.items():
        want_out = (f"out {i}\n".encode() if i % 7 else b"") + (b"\0" * 100000 if i % 100 == 0 else b"")
        want_err = f"err {i}".encode() if i % 3 == 0 else b""
        assert read_output(logs, ref, "stdout") == want_out, i
        assert read_output(logs, ref, "stderr") == want_err, i
        if not want_out and not want_err:
            assert ref is None
        else:
            assert len(ref) < 60  # compact: one extent per stream when attempts run one by one


def test_two_workers_share_a_folder(tmp_path):
    with OutputSink(tmp_path, "a") as a, OutputSink(tmp_path, "b") as b:
        ra = run(Command(shell="echo from-a"), a)
        rb = run(Command(shell="echo from-b"), b)
        assert read_output(tmp_path, ra.output, "stdout") == b"from-a\n"
        assert read_output(tmp_path, rb.output, "stdout") == b"from-b\n"
    assert sorted(os.listdir(tmp_path)) == ["a.out", "b.out"]


def test_concurrent_attempts_in_one_sink_stay_separate(tmp_path):
    # threads of one worker print interleaved, in many chunks, some past the 64 KiB buffer
    logs = tmp_path / "logs"
    results = {}
    lock = threading.Lock()
    script = (
        'i=$1; n=$2; k=0; while [ $k -lt 5 ]; do '
        'head -c "$n" /dev/zero | tr "\\0" "$((i % 10))"; printf "<%s:%s>" "$i" "$k" >&2; '
        'sleep 0.01; k=$((k+1)); done'
    )
    cmd = Command(argv=["sh", "-c", script, "sh", "{i}", "{n}"])
    sizes = {i: random.Random(i).choice([0, 10, 5000, 70000]) for i in range(24)}

    def worker(ids):
        for i in ids:
            res = run_command(cmd, {"i": str(i), "n": str(sizes[i])}, timeout=60, sink=sink,
                              task=i, attempt=1)
            with lock:
                results[i] = res

    with OutputSink(logs, "w1") as sink:
        threads = [threading.Thread(target=worker, args=(range(k, 24, 4),)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(os.listdir(logs)) == ["w1.err", "w1.out"]
    for i, res in results.items():
        assert res.ok, res
        digit = str(i % 10).encode()
        assert read_output(logs, res.output, "stdout") == digit * (5 * sizes[i]), i
        assert read_output(logs, res.output, "stderr") == b"".join(
            f"<{i}:{k}>".encode() for k in range(5)
        )


def test_per_task_mode(tmp_path):
    logs = tmp_path / "logs"
    with OutputSink(logs, "w1", per_task=True) as sink:
        r1 = run(Command(shell="printf 'a\\0b'; printf err >&2"), sink, task=5)
        r2 = run(Command(shell="printf only-out"), sink, task=6)
        r3 = run(Command(argv=["true"]), sink, task=7)
    assert r3.output is None
    assert sorted(os.listdir(logs / "tasks")) == ["5.1.w1.err", "5.1.w1.out", "6.1.w1.out"]
    assert read_output(tmp_path, r1.output, "stdout") == b"a\0b"
    assert read_output(tmp_path, r1.output, "stderr") == b"err"
    assert read_output(logs, r2.output, "stdout") == b"only-out"
    assert read_output(logs, r2.output, "stderr") == b""
    assert (logs / "tasks" / "6.1.w1.out").read_bytes() == b"only-out"


def test_per_task_mode_cap(tmp_path):
    with OutputSink(tmp_path, "w1", per_task=True) as sink:
        res = run(Command(shell="head -c 200000 /dev/zero", output_cap=1000), sink)
        assert "stdout cut at 1000 of 200000 bytes" in res.note
    assert (tmp_path / "tasks" / "1.1.w1.out").stat().st_size == 1000


@pytest.mark.slow
def test_output_reaches_the_log_while_the_command_runs(tmp_path):
    with OutputSink(tmp_path, "w1") as sink:
        t = threading.Thread(target=run, args=(Command(shell="echo early; sleep 1.6"), sink))
        t.start()
        time.sleep(1.3)
        assert (tmp_path / "w1.out").read_bytes() == b"early\n"
        t.join()


def test_read_output_errors(tmp_path):
    assert read_output(tmp_path, None, "stdout") == b""
    with pytest.raises(ValueError):
        read_output(tmp_path, "garbage", "stdout")
    with pytest.raises(ValueError):
        read_output(tmp_path, "s0+5//w1", "stdin")
    with pytest.raises(OutputUnavailable):
        read_output(tmp_path, "s0+5//nobody", "stdout")
    with OutputSink(tmp_path, "w1") as sink:
        res = run(Command(shell="echo 0123456789"), sink)
    with open(tmp_path / "w1.out", "r+b") as f:
        f.truncate(4)  # a torn log (host crash before the data reached the disk)
    with pytest.raises(OutputUnavailable):
        read_output(tmp_path, res.output, "stdout")


def test_bad_worker_id():
    for bad in ["", ".", "..", "a/b"]:
        with pytest.raises(ValueError):
            OutputSink(Path("/tmp"), bad)


def test_log_write_failure_is_a_note_not_a_crash(tmp_path):
    # RLIMIT_FSIZE makes writes past 1000 bytes fail (EFBIG), like a full disk or quota
    code = textwrap.dedent(
        f"""
        import resource, signal
        from pathlib import Path
        from pipefarm.execute.cmd import run_command
        from pipefarm.execute.template import Command
        from pipefarm.execute.output import OutputSink, read_output
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))
        sink = OutputSink(Path({str(tmp_path)!r}), "w1")
        res = run_command(Command(shell="head -c 100000 /dev/zero; echo done >&2"), {{}},
                          timeout=30, sink=sink, task=1, attempt=1)
        assert res.exit_code == 0, res
        assert "stdout: writing the log failed" in res.note, res.note
        got = read_output({str(tmp_path)!r}, res.output, "stdout")
        assert len(got) <= 1000 and got == b"\\0" * len(got), len(got)
        assert read_output({str(tmp_path)!r}, res.output, "stderr") == b"done\\n"
        print("OK", res.note)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK")


def test_read_output_refuses_paths_in_references(tmp_path):
    (tmp_path / "secret.out").write_bytes(b"x")
    sub = tmp_path / "sub"
    sub.mkdir()
    with pytest.raises(ValueError):
        read_output(sub, "s0+1//../secret", "stdout")
    with pytest.raises(ValueError):
        read_output(sub, "t1/0/../../secret", "stdout")


def test_command_can_ask_for_its_own_files(tmp_path):
    with OutputSink(tmp_path, "w1") as sink:  # a sink for shared files
        shared = run(Command(shell="echo shared"), sink, task=1)
        own = run(Command(shell="echo own", output_per_task=True), sink, task=2)
    assert read_output(tmp_path, shared.output, "stdout") == b"shared\n"
    assert read_output(tmp_path, own.output, "stdout") == b"own\n"
    assert (tmp_path / "tasks" / "2.1.w1.out").read_bytes() == b"own\n"
    assert (tmp_path / "w1.out").read_bytes() == b"shared\n"

"""Memory sizes and the pieces of a task's memory limit (pipefarm.execute.memory): parsing
``4G``-style sizes (one parser for task limits and ``pipefarm array --mem``), the data limit
a Python task runs under, the per-attempt peak, a process group's resident memory."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time

import pytest

import pipefarm as pf
from pipefarm.backends.array.spec import mem_mib
from pipefarm.errors import SubmissionError
from pipefarm.execute.memory import (
    MIB,
    PEAK_MIN_S,
    DataLimit,
    PeakMeter,
    format_memory,
    group_members,
    group_pss,
    group_rss,
    parse_memory,
)

PF = [sys.executable, "-m", "pipefarm"]


@pytest.mark.parametrize(("text", "expected"), [
    ("4G", 4 << 30), ("4GB", 4 << 30), ("4GiB", 4 << 30), ("4g", 4 << 30), (" 500M ", 500 * MIB),
    ("1.5T", 3 << 39), ("512K", None), ("2048K", 2 * MIB), ("100", 100 * MIB),
    (2 * MIB, 2 * MIB), ("0.5G", 512 * MIB),
])
def test_parse_memory(text, expected):
    if expected is None:
        with pytest.raises(ValueError, match="under 1 MiB"):
            parse_memory(text)
    else:
        assert parse_memory(text) == expected


@pytest.mark.parametrize(("bad", "why"), [
    ("4Q", "give a number and a unit"), ("lots", "give a number and a unit"),
    ("-4G", "give a number and a unit"), ("", "give a number and a unit"),
    (True, "give bytes"), (4.5, "give bytes"), (4096, r"under 1 MiB \(an int is bytes"),
    (0, "under 1 MiB"),
])
def test_bad_sizes_are_refused_with_the_reason(bad, why):
    with pytest.raises(ValueError, match=why):
        parse_memory(bad)


def test_array_mem_reads_sizes_with_the_same_parser():
    assert mem_mib("4G") == 4096 and mem_mib("1500M") == 1500 and mem_mib(4096) == 4096
    assert mem_mib("1.1M") == 2  # rounded up to whole MiB
    with pytest.raises(ValueError, match="give a number and a unit"):
        mem_mib("4Q")


def test_format_memory():
    assert format_memory(100 * MIB) == "100.0 MiB" and format_memory(3 << 30) == "3.0 GiB"
    assert format_memory(512) == "512 B"


def test_run_api_takes_bytes_and_sizes_and_refuses_bad_ones(tmp_path):
    run = pf.Run.create(tmp_path / "r")
    a = run.map(abs, [1, 2], memory="4G")
    b = run.submit_task(abs, (3,), memory=2 << 30)
    c = run.submit_cmd(["true"], memory="512M")
    specs = {run.store.tasks(ids=[t])[0].spec for t in (a[0], b, c[0])}
    assert sorted(run.store.spec(s).resources.memory for s in specs) == [
        512 * MIB, 2 << 30, 4 << 30]
    n = sum(run.store.counts().values())
    for call in (lambda: run.map(abs, [1], memory="4Q"),
                 lambda: run.submit_task(abs, (1,), memory=4096),
                 lambda: run.submit_cmd(["true"], memory="lots")):
        with pytest.raises(SubmissionError, match="^memory: "):
            call()
    assert sum(run.store.counts().values()) == n, "a refused submission wrote tasks"
    run.close()


def test_cli_submit_mem(tmp_path):
    ok = subprocess.run([*PF, "submit", str(tmp_path / "r"), "--mem", "4G", "--", "true"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    run = pf.Run.open(tmp_path / "r")
    (t,) = run.store.tasks()
    assert run.store.spec(t.spec).resources.memory == 4 << 30
    run.close()
    bad = subprocess.run([*PF, "submit", str(tmp_path / "b"), "--mem", "4Q", "--", "true"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert "Invalid value for '--mem': bad memory size '4Q'" in bad.stderr
    assert not (tmp_path / "b").exists()


def test_data_limit_refuses_an_allocation_past_it_and_is_put_back():
    before = resource.getrlimit(resource.RLIMIT_DATA)
    with DataLimit(64 * MIB) as lim:
        assert lim.active
        assert resource.getrlimit(resource.RLIMIT_DATA)[0] < before[0] or before[0] < 0
        with pytest.raises(MemoryError):
            bytearray(256 * MIB)
        small = bytearray(8 * MIB)  # within the limit: allowed
    assert resource.getrlimit(resource.RLIMIT_DATA) == before
    assert len(bytearray(256 * MIB)) == 256 * MIB and len(small) == 8 * MIB


def test_peak_meter_gives_each_attempt_its_own_peak():
    """After an attempt that held 150 MiB, the next one's peak is not that high-water mark
    (the meter reset it); a short attempt takes the mark as last read, with no system call."""
    meter = PeakMeter()
    meter.begin()
    b = bytearray(150 * MIB)
    b[::4096] = b"\1" * (len(b) // 4096)
    high = meter.peak(1.0)
    assert meter.stale
    del b
    meter.begin()
    low = meter.peak(1.0)
    assert high >= 150 * MIB and low < high - 100 * MIB, (high, low)
    assert meter.peak(PEAK_MIN_S / 2) == meter.mark


def test_the_first_attempt_in_a_process_does_not_get_its_start_up_peak():
    """A worker started (fork + exec) by a 300 MiB process, that itself held 200 MiB before
    its first attempt (imports, a loaded input) and freed them: that attempt's peak is its
    own, neither its start-up's nor its parent's (which ``ru_maxrss`` carries over exec)."""
    worker = (
        "from pipefarm.execute.py import run_python; from pipefarm.task import Lease, dumps_args;"
        " b = bytearray(200 << 20); b[::4096] = b'1' * (len(b) // 4096); del b;"
        " import time; f = run_python(lambda: time.sleep(0.01),"
        " Lease(task=1, token=1, attempt=1, spec=1, args=dumps_args((), {})));"
        " print(f.peak_memory >> 20)"
    )
    parent = (
        "import subprocess, sys; b = bytearray(300 << 20); b[::4096] = b'1' * (len(b) // 4096);"
        f" subprocess.run([sys.executable, '-c', {worker!r}], check=True)"
    )
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert int(out) < 150, f"first attempt's peak {out.strip()} MiB: not its own"


def test_a_forked_process_reads_its_own_peak():
    """The meter's descriptor of /proc/self/status is the parent's after fork: a child
    reads its own mark, not its 300 MiB parent's."""
    meter_read = (
        "import os; from pipefarm.execute.memory import METER;"
        " METER.begin(); b = bytearray(300 << 20); b[::4096] = b'1' * (len(b) // 4096);"
        " METER.peak(1.0); pid = os.fork()\n"
        "if pid == 0:\n"
        "    del b; METER.begin(); os.write(1, str(METER.peak(1.0) >> 20).encode()); os._exit(0)\n"
        "os.waitpid(pid, 0)"
    )
    out = subprocess.run([sys.executable, "-c", meter_read], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert int(out) < 150, f"the child's peak {out} MiB is its parent's"


def test_group_pss_skips_a_member_that_has_exited():
    """A group holding a zombie (an exited child not reaped yet, whose smaps_rollup fails
    with ESRCH) still has a proportional set size: the zombie counts nothing."""
    code = "import os, time; pid = os.fork()\nif pid == 0: os._exit(0)\ntime.sleep(30)"
    p = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(members := group_members(p.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(members) == 2, members
        time.sleep(0.2)  # the child has exited: a zombie in the group
        pss = group_pss(p.pid)
        assert pss is not None and pss > MIB, pss
    finally:
        p.kill()
        p.wait()


def test_group_rss_sums_the_members_of_a_group():
    code = "import time; b = bytearray(60 << 20); b[::4096] = b'1' * (len(b) // 4096); " \
           "print(1, flush=True); time.sleep(30)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         start_new_session=True)
    try:
        assert p.stdout.readline().strip() == b"1"
        assert group_rss(p.pid) >= 60 * MIB
        with open("/proc/self/statm") as fh:
            mine = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        assert group_rss(os.getpgid(0)) >= mine  # this process is one of its group's members
    finally:
        p.kill()
        p.wait()
    t0 = time.monotonic()
    assert group_rss(p.pid) == 0  # gone: nothing left to count
    assert time.monotonic() - t0 < 1.0


def test_group_pss_counts_shared_pages_once():
    """A process holding 60 MiB and a forked child sharing them: resident memory summed
    counts the pages twice, the proportional set size once."""
    code = ("import os, time; b = bytearray(60 << 20); b[::4096] = b'1' * (len(b) // 4096); "
            "pid = os.fork(); print(1, flush=True) if pid else None; time.sleep(30)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         start_new_session=True)
    try:
        assert p.stdout.readline().strip() == b"1"
        rss, pss = group_rss(p.pid), group_pss(p.pid)
        assert rss >= 120 * MIB, rss
        assert pss is not None and 60 * MIB <= pss < 100 * MIB, (rss, pss)
    finally:
        os.killpg(p.pid, 9)
        p.wait()

"""Memory limit per task (issue 12, part 4): a task past its limit is stopped, its attempt
ends ``oom`` with its peak memory, it is retried by policy, and its worker goes on; every
attempt records its peak memory.

Everything here allocates for real (bytearrays, lists of objects, C ``malloc`` through ctypes,
child processes). A Python task's peak is the resident peak of the process it ran in, so it
includes the worker's own memory (tens of MiB): limits are 100 MiB and allocations 200-400
MiB, far from that baseline.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import cloudpickle
import engines_lib as E
import pytest
import tasks_lib as T

import pipefarm as pf
from pipefarm.backends.array.worker_loop import work_loop
from pipefarm.execute.memory import MIB
from pipefarm.store.shared_fs import FsJournalStore
from pipefarm.task import Resources, Spec, dumps_args

# workers started afresh (not forked) must get these functions too: send them by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

LIMIT = 100 * MIB
CHUNK = 8 * MIB


def grow(mb: int) -> int:
    """Allocate ``mb`` MiB in 8 MiB bytearrays, every page touched; the worker's pid."""
    keep = []
    for _ in range(mb * MIB // CHUNK):
        b = bytearray(CHUNK)
        b[::4096] = b"\1" * (CHUNK // 4096)
        keep.append(b)
    return os.getpid()


def grow_noting(mb: int, note: str) -> int:
    """:func:`grow`, writing first the resident bytes of the process it runs in to ``note``."""
    import psutil

    with open(note, "w") as fh:
        fh.write(str(psutil.Process().memory_info().rss))
    return grow(mb)


def pid() -> int:
    return os.getpid()


def one_bytearray(mb: int) -> int:
    return len(bytearray(mb * MIB))


def many_objects(mb: int) -> int:
    """Small objects from Python's own allocator: ~32 bytes per int and 8 per list slot."""
    return len([i * 3 for i in range(mb * MIB // 40)])


def c_malloc(mb: int) -> int:
    """A C library's allocation, as numpy makes for an array's data: ``malloc``, and a
    MemoryError when it returns NULL."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    p = libc.malloc(mb * MIB)
    if not p:
        raise MemoryError(f"malloc({mb} MiB) returned NULL")
    try:
        ctypes.memset(p, 1, mb * MIB)
    finally:
        libc.free(ctypes.c_void_p(p))
    return mb


def _run(tmp_path, name="run"):
    return pf.Run.create(tmp_path / name)


def test_python_task_past_its_limit_ends_oom_twice_and_its_worker_goes_on(tmp_path, request):
    """retries=1: two ``oom`` attempts, each with its peak; the worker that ran them (same pid)
    runs the tasks after it."""
    if T.rerun_in_fresh_process(request):  # peaks measured from a worker's own baseline
        return
    run = _run(tmp_path)
    before = run.submit_task(pid, priority=3)
    big = run.submit_task(grow, (400,), memory="100M", retries=1, backoff=0.01, priority=2)
    after = [run.submit_task(pid, priority=1) for _ in range(3)]
    summary = run.execute(workers=1, progress=False)
    assert summary.counts["succeeded"] == 4 and summary.counts["failed"] == 1, summary.counts

    attempts = run.attempts(big)
    assert [a.outcome for a in attempts] == ["oom", "oom"]
    for a in attempts:
        assert "memory limit of 100.0 MiB" in a.error and "MemoryError" in a.error
        # the task touched ~all of its 100 MiB before the allocation past it was refused, on
        # top of the worker's own memory: its peak is at least 90 MiB and at most the limit
        # plus the worker and one chunk (200 MiB)
        assert 90 * MIB <= a.peak_memory <= 200 * MIB, a.peak_memory
    pids = {run.result(t) for t in (before, *after)}
    assert len(pids) == 1, f"the worker was replaced after the oom: {pids}"
    workers = {a.worker for t in (before, big, *after) for a in run.attempts(t)}
    assert len(workers) == 1, workers
    run.close()


@pytest.mark.parametrize("fn", [one_bytearray, many_objects, c_malloc])
def test_each_kind_of_allocation_is_stopped_in_the_sequential_backend(tmp_path, fn):
    """One 300 MiB bytearray, 300 MiB of small Python objects, 300 MiB from C ``malloc``:
    each ends ``oom`` under a 100 MiB limit, in the calling process (sequential backend),
    which then runs the next task; without a limit each succeeds."""
    run = _run(tmp_path)
    limited = run.submit_task(fn, (300,), memory=LIMIT, priority=2)
    free = run.submit_task(fn, (300,), priority=1)
    nxt = run.submit_task(pid)
    run.execute(backend="sequential", progress=False)
    assert [a.outcome for a in run.attempts(limited)] == ["oom"]
    assert run.attempts(free)[0].outcome == "succeeded"
    assert run.result(nxt) == os.getpid()
    run.close()


def test_command_past_its_limit_is_killed_and_ends_oom(tmp_path):
    """A shell whose child allocates 300 MiB and sleeps: the group's resident memory passes
    100 MiB, the whole group is killed at once (not after the 60 s sleep or the timeout), and
    the attempt ends ``oom`` with a peak above the limit (the sum that triggered the kill)."""
    run = _run(tmp_path)
    code = "b = bytearray(300 << 20); import time; time.sleep(60)"
    (t,) = run.submit_cmd(f"{sys.executable} -c '{code}' & wait", memory="100M", timeout=120)
    (ok,) = run.submit_cmd([sys.executable, "-c", "print('fine')"], memory="100M")
    summary = run.execute(workers=1, progress=False)
    assert summary.elapsed_s < 30, summary.elapsed_s
    (a,) = run.attempts(t)
    assert a.outcome == "oom", (a.outcome, a.error)
    assert "went past its memory limit of 100.0 MiB" in a.error
    assert a.peak_memory > LIMIT
    assert run.attempts(ok)[0].outcome == "succeeded"
    run.close()
    show = subprocess.run([sys.executable, "-m", "pipefarm", "show", str(tmp_path / "run"),
                           str(t)], capture_output=True, text=True, check=True).stdout
    assert "attempt 1: oom, exit -9 (SIGKILL)" in show
    assert f", peak {a.peak_memory / MIB:.1f} MiB" in show


def test_failures_groups_python_and_command_oom_as_one_cause(tmp_path):
    """``pipefarm failures``: a Python task stopped by MemoryError and a command whose group
    was killed are one cause, "past its memory limit", not two unrelated signatures."""
    run = _run(tmp_path)
    py = run.submit_task(one_bytearray, (300,), memory=LIMIT)
    code = "b = bytearray(300 << 20); import time; time.sleep(60)"
    (cmd,) = run.submit_cmd(f"{sys.executable} -c '{code}'", memory="100M", timeout=120)
    run.execute(workers=1, progress=False)
    run.close()
    out = subprocess.run([sys.executable, "-m", "pipefarm", "failures", str(tmp_path / "run"),
                          "--json"], capture_output=True, text=True, check=True).stdout
    groups = json.loads(out)
    assert [(g["signature"], sorted(g["task_ids"])) for g in groups] == [
        ("past its memory limit", sorted([py, cmd]))], groups


SHARED = """
import os, time
b = bytearray(150 << 20)
b[::4096] = b"1" * (len(b) // 4096)
kids = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        time.sleep(1.5)
        os._exit(0)
    kids.append(pid)
for k in kids:
    os.waitpid(k, 0)
"""


def test_forked_children_sharing_pages_count_them_once(tmp_path):
    """A command that holds 150 MiB and forks two children sharing it (copy-on-write) has
    ~450 MiB resident summed over its group but uses ~150 MiB: under a 300 MiB limit it
    succeeds (its proportional set size decides); under 100 MiB it ends ``oom``."""
    run = _run(tmp_path)
    (fits,) = run.submit_cmd([sys.executable, "-c", SHARED], memory="300M", priority=1)
    (past,) = run.submit_cmd([sys.executable, "-c", SHARED], memory="100M")
    run.execute(workers=1, progress=False)
    a = run.attempts(fits)[0]
    assert a.outcome == "succeeded", a.error
    assert 150 * MIB <= a.peak_memory < 300 * MIB, a.peak_memory
    assert run.attempts(past)[0].outcome == "oom"
    run.close()


def test_peak_memory_is_recorded_for_ordinary_tasks(tmp_path, request):
    """No limit: a Python task and a command that each hold 200 MiB show a peak of at least
    200 MiB; a small command and a small task after the Python one show their own (smaller)
    peaks, not the one before them (the command's mark starts at its worker's memory at exec,
    not at the worker's largest task); ``results`` carries the column."""
    if T.rerun_in_fresh_process(request):  # peaks measured from a worker's own baseline
        return
    run = _run(tmp_path)
    py = run.submit_task(grow, (200,), priority=4)
    (small_cmd,) = run.submit_cmd([sys.executable, "-c", "pass"], priority=3)
    small = run.submit_task(grow, (8,), priority=2)
    (cmd,) = run.submit_cmd(
        [sys.executable, "-c", "b = bytearray(200 << 20); b[::4096] = b'1' * (len(b) // 4096)"],
        priority=1)
    assert run.execute(workers=1, progress=False).ok
    peaks = {t: run.attempts(t)[-1].peak_memory for t in (py, small_cmd, small, cmd)}
    assert peaks[py] >= 200 * MIB, peaks
    assert peaks[cmd] >= 200 * MIB, peaks
    assert peaks[small] < peaks[py] - 100 * MIB, peaks
    assert peaks[small_cmd] < peaks[py] - 100 * MIB, peaks
    table = run.results()
    assert dict(zip(table.column("task_id").to_pylist(), table.column("peak_memory").to_pylist(),
                    strict=True)) == peaks
    run.close()
    out = subprocess.run([sys.executable, "-m", "pipefarm", "results", str(tmp_path / "run"),
                          "--format", "jsonl"], capture_output=True, text=True, check=True).stdout
    assert {r["task_id"]: r["peak_memory"] for r in map(json.loads, out.splitlines())} == peaks


def test_array_worker_records_oom_and_peaks_through_its_journal(tmp_path, request):
    """The shared-filesystem path: an array worker's journal carries the outcome and the
    peak; the fold puts both in the catalog."""
    if T.rerun_in_fresh_process(request):  # peaks measured from a worker's own baseline
        return
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    store = FsJournalStore(d, lease_s=5.0, workers=1)
    note = tmp_path / "rss-at-start"
    limited = store.add_spec(Spec(kind="py", payload=cloudpickle.dumps(grow_noting),
                                  resources=Resources(memory=LIMIT)))
    # the limited task first: a worker's peak counts the memory its process holds, and a
    # process keeps some of what an earlier 200 MiB task freed (glibc's heap)
    store.add_tasks(limited, [dumps_args((400, str(note)), {})], priority=2)
    free = store.add_spec(Spec(kind="py", payload=cloudpickle.dumps(grow)))
    store.add_tasks(free, [dumps_args((200,), {})], priority=1)
    store.export()
    # the worker loop runs in this process: its peak counts this process's own memory too
    work_loop(store.layout.run, "w", steal=False)
    baseline = int(note.read_text())
    store.fold()
    rows = {r.spec: r for r in store.tasks()}
    (oom,) = store.attempts(rows[limited].id)
    assert oom.outcome == "oom" and 90 * MIB <= oom.peak_memory <= baseline + LIMIT + 2 * CHUNK, (
        oom, baseline)
    (ok,) = store.attempts(rows[free].id)
    assert ok.outcome == "succeeded" and ok.peak_memory >= 200 * MIB, ok
    store.close()


@pytest.mark.parametrize("engine", E.ENGINES)
def test_oom_and_peaks_on_every_engine(tmp_path, engine):
    """``pipefarm run --backend E``: the engines run tasks in the local worker code, so a Python
    task and a command past their limits end ``oom`` there too, and peaks are recorded."""
    address = E.require(engine)
    run = _run(tmp_path)
    py = run.submit_task(grow, (400,), memory="100M", priority=3)
    (cmd,) = run.submit_cmd(
        [sys.executable, "-c", "import time; b = bytearray(300 << 20); time.sleep(60)"],
        memory="100M", timeout=120, priority=2)
    ok = run.submit_task(grow, (200,), priority=1)
    run.close()
    p = E.execute_on(engine, tmp_path / "run", 1, address)
    assert p.returncode == 1, (p.returncode, p.stderr[-3000:])  # some tasks failed
    run = pf.Run.open(tmp_path / "run")
    assert [a.outcome for a in run.attempts(py)] == ["oom"]
    assert [a.outcome for a in run.attempts(cmd)] == ["oom"]
    assert run.attempts(cmd)[0].peak_memory > LIMIT
    assert run.attempts(ok)[0].outcome == "succeeded"
    assert run.attempts(ok)[0].peak_memory >= 200 * MIB
    run.close()

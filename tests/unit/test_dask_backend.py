"""The dask backend against real Dask: a LocalCluster started for the run, a shared one reached
through a client, and an external ``dask scheduler`` + ``dask worker`` cluster of processes
(one of which is SIGKILLed mid-run)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import tasks_lib as T
from cli_lib import ok
from conftest import service_absent
from engines_lib import assert_once_each

import pipefarm as pf

try:
    import distributed
except ImportError:  # pragma: no cover - CI installs it (PIPEFARM_REQUIRE_SERVICES=1)
    distributed = None


@pytest.fixture(autouse=True)
def _need_dask():
    if distributed is None:
        service_absent("dask.distributed is not importable")


@pytest.fixture(scope="module", autouse=True)
def _no_thread_left():
    """Leave this process with one thread, as the next modules' local runs expect (they fork
    their workers only then): distributed keeps a global offload thread once it has run."""
    yield
    if distributed is not None:
        from concurrent.futures import ThreadPoolExecutor

        import distributed.utils as du

        old, du._offload_executor = du._offload_executor, ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="Dask-Offload")
        old.shutdown(wait=True)


@pytest.fixture(scope="module")
def client():
    """One LocalCluster of two single-threaded worker processes, shared by this module."""
    if distributed is None:
        service_absent("dask.distributed is not importable")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    c = distributed.Client(cluster, set_as_default=False)
    yield c
    c.close()
    cluster.close()


@pytest.mark.slow
def test_local_cluster_runs_python_and_command_tasks(tmp_path):
    d = tmp_path / "run"
    with pf.Run.create(d) as run:
        squares = run.map(T.square, range(3000))
        cmds = run.submit_cmd("echo line-{i}", [{"i": str(i)} for i in range(40)])
        said = run.submit(print, "hello from dask")
        # results bigger than a socket buffer: a report arrives in many reads
        big = run.map(T.big_bytes, range(3), [4 << 20] * 3)
        summary = run.execute(workers=2, backend="dask", progress=False)
        assert summary.ok and summary.total == 3044, summary
        assert summary.attempts == 3044
        assert [run.result(t) for t in squares] == [i * i for i in range(3000)]
        assert_once_each(run, [*squares, *cmds, said])
        assert all(run.result(t) == T.big_bytes(i, 4 << 20) for i, t in enumerate(big))
        assert run.output(cmds[7]) == b"line-7\n"
        workers = {t.worker for t in run.tasks(ids=list(squares))}
        # both slots stayed up (a worker replaced mid-run would be a third id)
        assert len(workers) <= 2 and all(w.startswith("dask-") for w in workers), workers
    assert ok("logs", d, str(said), cwd=tmp_path) == "hello from dask\n"
    assert ok("logs", d, str(cmds[3]), cwd=tmp_path) == "line-3\n"


@pytest.mark.slow
def test_retries_timeout_and_dependencies(tmp_path, client):
    with pf.Run.create(tmp_path / "run") as run:
        flaky = run.submit_task(T.count_then, (str(tmp_path / "count"), 3, "third time"),
                                retries=2, backoff=0.05)
        slow = run.submit_task(T.sleep_forever, (30.0,), timeout=1.0)
        skipped = run.submit_task(T.ident, ("never",), after=[slow])
        first = run.submit_task(T.log_start, (str(tmp_path / "order"), "a", 0.2))
        second = run.submit_task(T.log_start, (str(tmp_path / "order"), "b"), after=[first])
        hello = run.submit_cmd("sh -c 'sleep 30'", timeout=1.0)[0]
        t0 = time.monotonic()
        summary = run.execute(backend=pf.backends.make_backend("dask", client=client),
                              progress=False)
        assert time.monotonic() - t0 < 20
        assert run.result(flaky) == "third time"
        assert [a.outcome for a in run.attempts(flaky)] == ["failed", "failed", "succeeded"]
        assert [a.outcome for a in run.attempts(slow)] == ["timed_out"]
        assert "timed out after 1 s" in run.attempts(slow)[0].error
        assert [a.outcome for a in run.attempts(hello)] == ["timed_out"]
        assert run.tasks(ids=[skipped])[0].state == "skipped"
        assert (tmp_path / "order").read_text().split() == ["a", "b"]
        assert run.result(second) == "b"
        assert summary.counts["failed"] == 2 and summary.counts["skipped"] == 1, summary
        T.wait_until(lambda: not T.live_procs_with_cmdline(str(tmp_path / "run")), 10,
                     what="every pipefarm worker process to be gone")


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out += [int(x) for x in fh.read().split()]
        except OSError:
            pass
    return out


@pytest.mark.slow
def test_external_cluster_survives_a_killed_worker(tmp_path):
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    sched = subprocess.Popen(
        [*dask, "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0",
         "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    procs = [sched]
    try:
        address = None
        end = time.monotonic() + 20
        while address is None and time.monotonic() < end:
            line = sched.stderr.readline()
            m = re.search(r"Scheduler at:\s+(tcp://\S+)", line)
            address = m.group(1) if m else None
        assert address, "the scheduler did not start"
        # keep reading its log, or it blocks writing to a full pipe
        threading.Thread(target=sched.stderr.read, daemon=True).start()
        for _ in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers", "1",
                 "--nthreads", "1", "--no-dashboard"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with distributed.Client(address, set_as_default=False) as c:
            c.wait_for_workers(2, timeout=20)
        with pf.Run.create(tmp_path / "run") as run:
            marks = tmp_path / "marks"
            marks.mkdir()
            ids = run.map(T.mark_and_double, [str(marks)] * 40, range(40), [0.1] * 40)
            victim = procs[1]

            def kill_one(counts):
                if counts.get("succeeded", 0) >= 6 and victim.poll() is None:
                    for pid in [victim.pid, *_children(victim.pid)]:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    victim.wait()

            summary = run.execute(workers=2, backend="dask", address=address, progress=False,
                                  on_progress=kill_one)
            assert victim.poll() is not None, "the worker was not killed mid-run"
            assert summary.ok, summary
            assert [run.result(t) for t in ids] == [2 * i for i in range(40)]
            assert_once_each(run, ids, allowed=("lost", "released"))
            lost = [a for t in ids for a in run.attempts(t) if a.outcome == "lost"]
            assert len(lost) <= 2  # at most the task each slot on that worker ran
        # the killed worker's pipefarm process died with it (parent-death signal); the others
        # exited at the end of the run
        T.wait_until(lambda: not T.live_procs_with_cmdline(str(tmp_path / "run")), 10,
                     what="every pipefarm worker process to be gone")
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def test_a_tasks_exception_keeps_its_attributes_after_distributed_is_imported() -> None:
    """distributed installs tblib's reducers for every exception class on import; a worker
    forked from such a process still records ``SystemExit('msg')`` with its code."""
    import importlib.util

    if importlib.util.find_spec("distributed") is None:
        service_absent("dask.distributed is not installed")
    code = ("import pickle, distributed; from pipefarm.execute.py import dump_exception;"
            " e = pickle.loads(dump_exception(SystemExit('msg')));"
            " raise SystemExit(0 if e.code == 'msg' else 1)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr

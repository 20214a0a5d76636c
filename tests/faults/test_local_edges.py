"""Edges of the local backend and of ``pf.Executor``.

- a worker that dies just as a batch is sent to it is a lost worker, never a crash of the run;
- workers that cannot start fail the Executor's futures (``BrokenExecutor``) and name the cause;
  workers get the parent's import path;
- an absurd ``--workers`` starts no more workers than there are tasks, and SIGTERM stops a big
  start within seconds;
- batches are sized per function, split over the workers that want work, and a busy worker's
  unstarted tasks are stolen by an idle one.

Real processes, real signals, no mocks.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tasks_lib as T

import pipefarm as pf
from pipefarm.backends.base import Hooks
from pipefarm.backends.local import LocalBackend

SRC = str(Path(pf.__file__).resolve().parents[1])  # the directory that holds the package


# --- helpers ---------------------------------------------------------------------------------------
def _worker_rows(run_dir: Path) -> list[tuple[str, int]]:
    con = sqlite3.connect(f"file:{run_dir / 'catalog.db'}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute("SELECT id, pid FROM workers").fetchall()
    finally:
        con.close()


def _assert_each_succeeded_once(run: pf.Run, ids, allowed=("lost",)) -> None:
    """Every task has exactly one ``succeeded`` attempt; any other attempt is in ``allowed``."""
    for tid in ids:
        outcomes = [a.outcome for a in run.attempts(tid)]
        assert outcomes.count("succeeded") == 1, (tid, outcomes)
        assert set(outcomes) <= {"succeeded", *allowed}, (tid, outcomes)


def _marker_counts(marker_dir: Path, n: int) -> list[int]:
    return [len((marker_dir / str(i)).read_text().splitlines()) if (marker_dir / str(i)).exists()
            else 0 for i in range(n)]


def _plain_interpreter() -> str:
    """An interpreter that cannot import pipefarm (nor msgspec) by itself: the one the venv was
    made from. Skips when there is none."""
    base = getattr(sys, "_base_executable", None)
    if not base or sys.prefix == sys.base_prefix:
        pytest.skip("not in a virtual environment: no interpreter without pipefarm installed")
    probe = subprocess.run(
        [base, "-s", "-c", "import importlib.util as u; print(u.find_spec('pipefarm') is None"
         " and u.find_spec('msgspec') is None)"],
        capture_output=True, text=True, env=_clean_env(), timeout=60,
    )
    if probe.stdout.strip() != "True":
        pytest.skip(f"{base} can import pipefarm or msgspec by itself")
    return base


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    for k in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"):
        env.pop(k, None)
    return env


def _site_packages() -> str:
    import msgspec

    return str(Path(msgspec.__file__).resolve().parents[1])


# --- item 4: a worker that dies just as a batch is sent ----------------------------------------------
def test_worker_dead_before_a_send_is_lost_not_a_crash(tmp_path):
    """Both workers are SIGKILLed (and left as zombies) between two sends of one dispatch pass:
    the second send meets a dead pipe. The run goes on with new workers."""
    run = pf.Run.create(tmp_path / "run")
    ids = run.map(T.square, range(200))
    killed: list[int] = []

    def on_dispatch(leases):
        if killed:
            return
        pids = [pid for _, pid in _worker_rows(run.path)]
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        # zombies linger until the coordinator reaps them: their pipes are closed by then
        T.wait_until(lambda: all(T.proc_state(p) in ("Z", None) for p in pids), 10,
                     what="the killed workers to be zombies")

    t0 = time.monotonic()
    summary = LocalBackend(2).execute(run.store, Hooks(run_dir=str(run.path), on_dispatch=on_dispatch))
    assert len(killed) == 2
    assert summary.ok, summary
    assert time.monotonic() - t0 < 30
    assert [run.result(t) for t in ids] == [x * x for x in range(200)]
    _assert_each_succeeded_once(run, ids)
    assert len(_worker_rows(run.path)) >= 3, "the dead workers were not replaced"


def test_random_worker_kills_every_task_succeeds_exactly_once(tmp_path):
    """Workers are SIGKILLed at random moments (each left a zombie before the coordinator goes
    on, so its next send to it may meet a dead pipe): every task still succeeds exactly once."""
    n = 3000
    run = pf.Run.create(tmp_path / "run")
    # the lost budget is not what this tests: a task whose worker is killed three times in a
    # row (a fresh worker started from a threaded test process takes long enough to be hit
    # again) would rightly end failed with the default max_lost=3
    ids = run.map(T.sleep_then, range(n), [0.001] * n, max_lost=50)
    rng = random.Random(1234)
    me = os.getpid()
    kills: list[int] = []
    last = [0.0]

    def on_progress(counts):
        # kill only once something succeeded (a run whose workers all die at start stops)
        now = time.monotonic()
        if counts.get("succeeded", 0) == 0 or now - last[0] < rng.uniform(0.02, 0.08):
            return
        workers = T.own_descendants(me)  # not the engines other tests share
        if not workers:
            return
        victim = rng.choice(workers)
        os.kill(victim, signal.SIGKILL)
        kills.append(victim)
        T.wait_until(lambda: T.proc_state(victim) in ("Z", None), 10, what="a zombie")
        last[0] = time.monotonic()

    summary = run.execute(workers=2, progress=False, on_progress=on_progress)
    assert summary.ok, summary
    assert len(kills) >= 10, f"only {len(kills)} kills: the test did not exercise anything"
    assert [run.result(t) for t in ids] == list(range(n))
    # "released": a task that had been marked running and had ended, unreported, when its
    # worker was killed running the next one
    _assert_each_succeeded_once(run, ids, allowed=("lost", "released"))


# --- item 5: workers that cannot start ------------------------------------------------------------------
SYS_PATH_ONLY = """\
import os, sys
sys.path[:0] = [{src!r}, {site!r}]
import pipefarm as pf
assert pf.__file__.startswith({src!r}), pf.__file__
try:
    with pf.Executor(max_workers=2) as ex:
        print("results", list(ex.map(pow, [2, 3, 4], [2, 2, 2], timeout=60)), flush=True)
except BaseException as exc:
    print("error", type(exc).__name__, exc, flush=True)
    os._exit(3)
print("shut down", flush=True)
"""


def test_executor_parent_with_sys_path_only_starts_workers(tmp_path):
    """pipefarm importable in the parent only through ``sys.path``: workers get that path."""
    base = _plain_interpreter()
    script = tmp_path / "sys_path_only.py"
    script.write_text(SYS_PATH_ONLY.format(src=SRC, site=_site_packages()))
    p = subprocess.run([base, "-s", str(script)], capture_output=True, text=True,
                       env=_clean_env(), timeout=120, cwd=tmp_path)
    assert "results [4, 9, 16]" in p.stdout, (p.stdout, p.stderr[-3000:])
    assert "shut down" in p.stdout and p.returncode == 0, (p.stdout, p.stderr[-3000:])


CANNOT_START = """\
import concurrent.futures as cf, os, sys, time
sys.path[:0] = [{src!r}, {site!r}]
import pipefarm as pf
import pipefarm.executor
sys.path.remove({src!r})  # this process keeps pipefarm; a fresh interpreter cannot find it
ex = pf.Executor(max_workers=2)
t0 = time.monotonic()
futures = [ex.submit(pow, 2, i) for i in range(5)]
for f in futures:
    try:
        f.result(timeout=60)
        print("UNEXPECTED result", flush=True)
    except BaseException as exc:
        print("error", type(exc).__name__, isinstance(exc, cf.BrokenExecutor),
              isinstance(exc, getattr(pf.executor, "BrokenExecutor", ())), f"{{time.monotonic() - t0:.1f}}",
              str(exc).replace("\\n", " | "), flush=True)
try:
    ex.submit(pow, 2, 2)
    print("UNEXPECTED submit accepted", flush=True)
except BaseException as exc:
    print("submit", type(exc).__name__, isinstance(exc, cf.BrokenExecutor), flush=True)
ex.shutdown(wait=True)
print("shut down", flush=True)
"""


def test_executor_workers_cannot_start_fail_futures_and_refuse_work(tmp_path):
    """A worker that cannot import pipefarm: every future fails with a BrokenExecutor that
    quotes the worker's stderr, within seconds; later submits are refused; shutdown returns."""
    base = _plain_interpreter()
    script = tmp_path / "cannot_start.py"
    script.write_text(CANNOT_START.format(src=SRC, site=_site_packages()))
    p = subprocess.run([base, "-s", str(script)], capture_output=True, text=True,
                       env=_clean_env(), timeout=120, cwd=tmp_path)
    out = p.stdout
    errors = [line for line in out.splitlines() if line.startswith("error ")]
    assert len(errors) == 5, (out, p.stderr[-3000:])
    for line in errors:
        _, name, is_cf, is_pf, elapsed, message = line.split(" ", 5)
        assert is_cf == "True" and is_pf == "True", line
        assert float(elapsed) < 30, line
        assert "No module named 'pipefarm'" in message, line
    assert "submit BrokenExecutor True" in out, out
    assert "shut down" in out and p.returncode == 0, (out, p.stderr[-3000:])


def test_executor_broken_environment_in_process(monkeypatch):
    """An environment in which no fresh Python starts at all (a malformed PYTHONHASHSEED)."""
    monkeypatch.setenv("PYTHONHASHSEED", "not-a-number")
    ex = pf.Executor(max_workers=2)
    try:
        t0 = time.monotonic()
        f = ex.submit(pow, 2, 3)
        with pytest.raises(cf.BrokenExecutor) as info:
            f.result(timeout=60)
        assert time.monotonic() - t0 < 30
        assert "PYTHONHASHSEED" in str(info.value), str(info.value)  # the dying worker's stderr
        with pytest.raises(cf.BrokenExecutor):
            ex.submit(pow, 2, 2)
    finally:
        ex.shutdown(wait=True)


DYING_AT_START = """
import sys, time
import pipefarm as pf
import pipefarm.worker

def broken(*args, **kwargs):  # the forked workers inherit this: each dies as it starts
    raise IsADirectoryError(21, "Is a directory", "logs/worker.out")

run = pf.Run.create(sys.argv[1])
run.map(pow, range(4), [2] * 4)
pipefarm.worker.serve_pipe = broken
t0 = time.monotonic()
try:
    run.execute(workers=2, progress=False)
except RuntimeError as exc:
    print("raised", round(time.monotonic() - t0, 1), run.status()["ready"], exc)
"""


def test_run_workers_dying_at_start_name_the_cause(tmp_path):
    """Run.execute's "workers keep dying at start" quotes what killed them.

    In a process of its own: workers are forked only from a single-threaded process, and the
    fault is injected where a forked worker starts serving (its log files are named by a random
    tag, so a directory can no longer stand in their place)."""
    p = subprocess.run([sys.executable, "-c", DYING_AT_START, str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=120)
    assert p.stdout.startswith("raised "), (p.stdout, p.stderr[-3000:])
    _, elapsed, ready, message = p.stdout.split(" ", 3)
    assert float(elapsed) < 30
    assert "keep dying at start" in message and "IsADirectoryError" in message, message
    assert ready == "4"  # nothing recorded is lost, nothing charged

def test_sigterm_during_a_big_start_stops_within_seconds(tmp_path):
    n = 1000
    run_dir = tmp_path / "run"
    run = pf.Run.create(run_dir)
    run.map(T.sleep_then, range(n), [60.0] * n)
    run.close()
    err = open(tmp_path / "coordinator.err", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "pipefarm", "run", str(run_dir), "--workers",
                             str(n), "--no-progress"], stdout=err, stderr=err,
                            stdin=subprocess.DEVNULL)
    err.close()
    try:
        T.wait_until(lambda: len(T.descendants(proc.pid)) >= 10, 60, interval=0.005,
                     what="the first workers")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        stopped_in = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert stopped_in < 5.0, f"SIGTERM took {stopped_in:.1f} s to stop the run"
    T.wait_until(lambda: not T.live_procs_with_cmdline(str(run_dir)), 5,
                 what="the workers to be gone")
    assert len(_worker_rows(run_dir)) < n
    # nothing was charged: every task is ready again
    with pf.Run.open(run_dir) as again:
        assert again.status().get("ready") == n


def test_executor_starts_workers_lazily():
    """ProcessPoolExecutor-like: a process per call in flight, up to max_workers."""
    def worker_procs():
        return [p for p in T.own_descendants(os.getpid())
                if "pipefarm.worker" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]

    before = set(worker_procs())
    with pf.Executor(max_workers=16) as ex:
        assert ex.submit(T.sleep_getpid, 0.0).result(timeout=60) != os.getpid()
        started = set(worker_procs()) - before
        assert len(started) == 1, f"{len(started)} workers started for one call"
        pids = {f.result(timeout=60) for f in [ex.submit(T.sleep_getpid, 0.5) for _ in range(3)]}
        started = set(worker_procs()) - before
        assert 2 <= len(pids) and len(started) <= 3, (pids, started)


# --- item 9: balancing work ---------------------------------------------------------------------------
def test_slow_function_after_instant_history_spreads_over_workers(tmp_path):
    """2,000 instant tasks of one function, then 20 x 0.5 s of another, on 2 workers."""
    markers = tmp_path / "markers"
    markers.mkdir()
    run = pf.Run.create(tmp_path / "run")
    run.map(T.square, range(2000))
    slow = run.map(T.mark_and_double, [str(markers)] * 20, range(20), [0.5] * 20)
    t0 = time.monotonic()
    summary = run.execute(workers=2, progress=False)
    wall = time.monotonic() - t0
    assert summary.ok, summary
    by_worker = collections.Counter(run.attempts(t)[-1].worker for t in slow)
    assert len(by_worker) == 2 and min(by_worker.values()) >= 6, by_worker
    assert wall < 7.5, f"{wall:.1f} s for 10 s of work on 2 workers"
    assert _marker_counts(markers, 20) == [1] * 20  # each ran exactly once
    _assert_each_succeeded_once(run, slow, allowed=())


def test_mixed_durations_of_one_function_are_stolen_by_the_idle_worker(tmp_path):
    """One function: 2,000 instant calls, 20 of 0.5 s, 2,000 instant. Batches sized for the
    instant ones put the slow ones behind each other on one worker; the idle one steals them."""
    markers = tmp_path / "markers"
    markers.mkdir()
    secs = [0.0] * 2000 + [0.5] * 20 + [0.0] * 2000
    run = pf.Run.create(tmp_path / "run")
    ids = run.map(T.mark_and_double, [str(markers)] * len(secs), range(len(secs)), secs)
    t0 = time.monotonic()
    summary = run.execute(workers=2, progress=False)
    wall = time.monotonic() - t0
    assert summary.ok, summary
    slow = ids[2000:2020]
    by_worker = collections.Counter(run.attempts(t)[-1].worker for t in slow)
    assert len(by_worker) == 2 and min(by_worker.values()) >= 6, by_worker
    assert wall < 7.5, f"{wall:.1f} s for 10 s of work on 2 workers"
    assert _marker_counts(markers, len(secs)) == [1] * len(secs)  # each ran exactly once
    _assert_each_succeeded_once(run, ids, allowed=())


def test_executor_calls_submitted_one_by_one_after_warm_up_use_both_workers():
    with pf.Executor(max_workers=2) as ex:
        assert len(list(ex.map(T.sleep_getpid, [0.0] * 2000))) == 2000  # warm-up
        t0 = time.monotonic()
        futures = [ex.submit(T.sleep_getpid, 0.3) for _ in range(8)]
        pids = [f.result(timeout=60) for f in futures]
        wall = time.monotonic() - t0
    assert len(set(pids)) == 2, collections.Counter(pids)
    assert wall < 2.1, f"{wall:.2f} s for 8 x 0.3 s on 2 workers"


# --- the coordinator's bookkeeping, without processes --------------------------------------------
class _CommitOnlyStore:
    """Just what Coordinator._commit calls."""

    def transaction(self):
        import contextlib

        return contextlib.nullcontext(self)

    def finish_leased(self, worker, ok, others):
        return len(ok) + len(others)

    def has_deps(self):
        return False


def test_progress_counts_take_started_successes_from_running_not_ready():
    from pipefarm.backends.base import Hooks as H
    from pipefarm.backends.coordinator import Coordinator, Options

    c = Coordinator(Options(2), None, _CommitOnlyStore(), H())
    # as read from the store: tasks 1 and 2 were recorded as running, 3..5 are ready
    c.counts = {"ready": 3, "running": 2, "succeeded": 0}
    c.counts_stale = False
    c.marked = {1, 2}
    c.inflight = {1, 2, 3}
    c.pending_ok["w"] = [(1,), (2,), (3,)]
    c.n_pending = 3
    c._commit(force=True)
    assert c.counts == {"ready": 2, "running": 0, "succeeded": 3}


def test_backends_by_name_and_by_contract():
    from pipefarm.backends import Backend, installed, make_backend
    from pipefarm.backends.sequential import SequentialBackend

    assert {"local", "sequential"} <= set(installed())
    assert isinstance(make_backend("local", 1), LocalBackend)
    assert isinstance(make_backend("sequential"), SequentialBackend)
    for be in (LocalBackend(1), SequentialBackend()):
        assert isinstance(be, Backend)
        assert make_backend(be) is be
    with pytest.raises(ValueError, match="unknown backend 'nope'; installed: .*local.*sequential"):
        make_backend("nope")

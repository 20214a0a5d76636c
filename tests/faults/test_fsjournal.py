"""The shared-filesystem protocol with real processes (store/shared_fs/): workers killed and
restarted, a SIGSTOPped zombie, torn journals, skewed clocks, drains, waves, and the metadata
operations a task costs.

Workers here share one host and one local filesystem; every mechanism they use (exclusive
creates, renames, mtimes, appends) is the one they use on NFS, Lustre or GPFS.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import cloudpickle
import pytest

from pipefarm.backends.array.worker_loop import work_loop
from pipefarm.errors import UnsafeRun
from pipefarm.states import Outcome
from pipefarm.store.journal import Ended, frame, read_journal
from pipefarm.store.shared_fs import (
    FsJournalStore,
    FsWorker,
    decode,
    list_claims,
)
from pipefarm.task import Spec, dumps_args

FORK = mp.get_context("fork")
HERE = os.path.dirname(os.path.abspath(__file__))


# --- tasks (module level: workers unpickle them by reference) -------------------------------------
def pause(seconds):
    """Sleep in a way that also works under faketime (whose time.sleep returns at once, or
    fails, when the offset is negative)."""
    threading.Event().wait(seconds)


def value_of(i, seconds=0.0):
    if seconds:
        pause(seconds)
    return i * 7 + 1


def gated(i, gate):
    """Wait until ``gate`` exists."""
    while not os.path.exists(gate):
        pause(0.01)
    return i * 7 + 1


def who(i, seconds=0.0):
    if seconds:
        pause(seconds)
    return (i, os.getpid())


# --- helpers ----------------------------------------------------------------------------------------
def make_run(tmp_path, fn, args, *, lease_s, workers=8, name="run", export=True, **spec_kw):
    run = tmp_path / name
    run.mkdir(mode=0o700)
    store = FsJournalStore(run, lease_s=lease_s, workers=workers)
    sid = store.add_spec(Spec(kind="py", payload=cloudpickle.dumps(fn), **spec_kw))
    ids = store.add_tasks(sid, [dumps_args(a, {}) for a in args])
    if export:
        store.export()
    return store, sid, ids


def _work(run, wid, out, kw):
    stats = work_loop(run, wid, **kw)
    if out:
        with open(out, "w") as fh:
            json.dump(stats.__dict__, fh)


def spawn(run, wid, out=None, **kw):
    """A worker process (forked: no interpreter start-up)."""
    p = FORK.Process(target=_work, args=(str(run), wid, out, kw), daemon=True)
    p.start()
    return p


def wait_for(pred, timeout, what, step=0.01):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(step)


def records(layout, worker):
    return [decode(r) for r in read_journal(layout.journal_of(worker)).records]


def journal_ends(layout):
    """Every Ended record in every journal: (worker, record)."""
    out = []
    for name in os.listdir(layout.journal):
        w = name[:-4]
        out += [(w, r) for r in records(layout, w) if isinstance(r, Ended)]
    return out


def kill(p):
    if p.is_alive():
        os.kill(p.pid, signal.SIGKILL)
    p.join(10)


# --- 8 workers, SIGKILLs and restarts, 20,000 tasks ---------------------------------------------------
def test_eight_workers_killed_and_restarted_lose_and_duplicate_nothing(tmp_path):
    n, lease = 20_000, 1.0
    store, sid, ids = make_run(tmp_path, value_of, [(i, 0.0003) for i in range(n)],
                               lease_s=lease, workers=8, max_lost=50)
    run = store.layout.run
    rng = random.Random(20_000)
    live = {f"w{i}": spawn(run, f"w{i}") for i in range(8)}
    gen, kills, same_id = 8, 0, 0
    gone: set[str] = set()
    t0 = time.monotonic()
    while kills < 16 and time.monotonic() - t0 < 30:
        time.sleep(rng.uniform(0.05, 0.25))
        running = [w for w, p in live.items() if p.is_alive()]
        if len(running) < 2:
            break
        victim = rng.choice(running)
        kill(live.pop(victim))
        kills += 1
        if kills % 3 == 0:  # restarted under the same id: it must finish its own old block
            wid = victim
            same_id += 1
            gone.discard(victim)
        else:
            wid, gen = f"w{gen}", gen + 1
            gone.add(victim)  # never reopens its journal: a torn tail there stays torn
        live[wid] = spawn(run, wid)
    for p in live.values():
        p.join(90)
        assert p.exitcode == 0, "a worker did not finish by itself"
    assert kills >= 8 and same_id >= 2

    st = store.fold()
    # a SIGKILL may cut a worker's last append: that tail is ignored, and repaired only by
    # its owner reopening the journal, so it may stay torn in workers that never came back
    assert set(st.torn) <= {f"{w}.log" for w in gone}, (st.torn, gone)
    assert st.corrupt == []
    assert store.counts()["succeeded"] == n
    for row in store.results():
        assert row[2] == 4 and pickle.loads(row[5]) == (row[0] - 1) * 7 + 1
    # no result lost or duplicated: exactly one successful end per task in all the journals
    ends = Counter(r.task for _, r in journal_ends(store.layout) if r.outcome == Outcome.SUCCEEDED)
    assert set(ends) == set(ids) and max(ends.values()) == 1
    lost = store.catalog.db.execute("SELECT count(*) FROM attempts WHERE outcome=3").fetchone()[0]
    stale = store.catalog.db.execute("SELECT count(*) FROM attempts WHERE outcome=5").fetchone()[0]
    assert stale == 0 and lost <= kills
    # orphaned blocks were taken over while the run went on, not at its end
    claims = os.listdir(store.layout.claims)
    assert any(re.fullmatch(r"\d+\.[1-9]\d*", c) for c in claims)
    store.close()


# --- a zombie -----------------------------------------------------------------------------------
def test_zombie_results_after_takeover_are_stale(tmp_path):
    lease = 1.0
    store, sid, ids = make_run(tmp_path, who, [(i, 0.4) for i in range(6)], lease_s=lease,
                               workers=1, export=False)
    store.export(min_block=6)  # one block of the six
    lay = store.layout
    zout, bout = str(tmp_path / "z.json"), str(tmp_path / "b.json")
    z = spawn(lay.run, "zombie", zout)
    wait_for(lambda: sum(type(r).__name__ == "Started" for r in records(lay, "zombie")) >= 2,
             20, "the zombie to start its second task")
    os.kill(z.pid, signal.SIGSTOP)
    try:
        b = spawn(lay.run, "b", bout)
        b.join(30)
        assert b.exitcode == 0
        assert os.path.exists(lay.claim(1, 1)), "b took block 1 over (epoch 1)"
    finally:
        os.kill(z.pid, signal.SIGCONT)
    z.join(30)
    assert z.exitcode == 0
    zs, bs = json.load(open(zout)), json.load(open(bout))
    assert zs["abandoned"] == 1 and bs["takeovers"] == 1

    store.fold()
    assert store.counts()["succeeded"] == 6
    # the task the zombie was running when stopped: it finished it late, after the takeover
    late = [a for t in ids for a in store.attempts(t) if a.outcome == "stale"]
    assert len(late) == 1 and late[0].worker == "zombie"
    t = late[0].task
    outcomes = sorted((a.worker, a.outcome) for a in store.attempts(t))
    assert outcomes == [("b", "succeeded"), ("zombie", "lost"), ("zombie", "stale")]
    assert pickle.loads(store.result(t)[1])[1] == b.pid, "the task keeps the current holder's result"
    # everything else ran once, by whoever held its block
    assert sum(pickle.loads(store.result(x)[1])[1] == z.pid for x in ids) == t - ids[0]
    store.close()


# --- torn journal tail --------------------------------------------------------------------------
def test_torn_journal_tail_is_ignored_then_repaired_by_its_owner(tmp_path):
    lease = 1.0
    store, sid, ids = make_run(tmp_path, value_of, [(i, 0.01) for i in range(60)], lease_s=lease,
                               workers=1)
    lay = store.layout
    p = spawn(lay.run, "w")
    wait_for(lambda: sum(isinstance(r, Ended) for r in records(lay, "w")) >= 20, 20, "20 tasks")
    kill(p)
    with open(lay.journal_of("w"), "ab") as fh:  # it died half-way through an append
        fh.write(frame([b"\x92\x02" + b"\x00" * 300])[:100])
    st = store.fold()
    assert st.torn == ["w.log"] and st.corrupt == []
    done = store.counts()["succeeded"]
    assert 20 <= done < 60
    # the owner comes back under the same id: it cuts the tail and finishes its own block
    w = FsWorker(lay.run, "w")
    w.register()
    assert w.journal.repaired == 100
    w.close()
    stats = work_loop(lay.run, "w")
    assert stats.exit == "finished" and stats.takeovers == 1
    st = store.fold()
    assert st.torn == []
    assert store.counts()["succeeded"] == 60
    assert [pickle.loads(store.result(t)[1]) for t in ids] == [i * 7 + 1 for i in range(60)]
    store.close()


# --- clock skew -------------------------------------------------------------------------------------
SKEW_MAIN = (
    "import sys, json, time\n"
    "sys.path.insert(0, {here!r})\n"
    "if {patch}:\n"
    "    _t, _tn = time.time, time.time_ns\n"
    "    time.time = lambda: _t() + {offset}\n"
    "    time.time_ns = lambda: _tn() + int({offset} * 1e9)\n"
    "from pipefarm.backends.array.worker_loop import work_loop\n"
    "s = work_loop(sys.argv[1], sys.argv[2], steal=False)  # takeovers, not splits, here\n"
    "json.dump(s.__dict__, open(sys.argv[3], 'w'))\n"
)


def skewed(run, wid, offset_s, out):
    """A worker whose clock is off by ``offset_s``: under faketime when installed (which also
    stamps the worker's own files with the skewed time: ``utime(NULL)`` is rewritten), else
    with time.time patched. Only the wall clock is skewed, as on a real node: the monotonic
    clock is per boot and never compared between nodes (faking it would also break every
    timed wait in the process)."""
    faketime = shutil.which("faketime")
    code = SKEW_MAIN.format(here=HERE, patch=faketime is None, offset=offset_s)
    cmd = [sys.executable, "-c", code, str(run), wid, out]
    env = dict(os.environ)
    if faketime:
        cmd = [faketime, "-f", f"{offset_s:+d}s", *cmd]
        env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
    err = open(out + ".err", "wb")
    return subprocess.Popen(cmd, env=env, start_new_session=True, stderr=err)


def alive(*procs):
    """Fail at once, with its stderr, when a skewed worker died by itself."""
    for p in procs:
        if p.poll() is not None and p.returncode != 0:
            raise AssertionError(f"a skewed worker exited {p.returncode}: "
                                 + open(p.args[-1] + ".err", "rb").read().decode()[-2000:])
    return True


def killpg(p):
    """Kill a skewed worker (faketime runs it as a child: the whole group)."""
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def test_clock_skew_neither_steals_live_blocks_nor_keeps_dead_ones(tmp_path):
    lease = 1.0
    store, sid, ids = make_run(tmp_path, value_of, [(i, 0.25) for i in range(32)], lease_s=lease,
                               workers=2, export=False, max_lost=5)
    lay = store.layout
    store.export(min_block=16)  # blocks 1 and 2
    l1, l2 = spawn(lay.run, "l1"), spawn(lay.run, "l2")
    wait_for(lambda: all(os.path.exists(lay.claim(b, 0)) for b in (1, 2)), 20, "claims")
    ahead2 = None
    ahead = skewed(lay.run, "ahead", 3600, str(tmp_path / "ahead.json"))
    behind = skewed(lay.run, "behind", -3600, str(tmp_path / "behind.json"))
    try:
        wait_for(lambda: all(os.path.exists(lay.hb_of(w)) for w in ("ahead", "behind")), 20, "hb")
        if shutil.which("faketime"):
            time.sleep(0.5)
            skew = os.stat(lay.hb_of("ahead")).st_mtime - time.time()
            assert skew > 3000, "faketime stamps the skewed worker's heartbeat with its clock"
        # phase 1: both skewed workers watch live holders for several lease times
        time.sleep(3 * lease)
        assert not os.path.exists(lay.claim(1, 1)) and not os.path.exists(lay.claim(2, 1)), (
            "a skewed worker took a block from a live holder"
        )
        # phase 2: the holders die; the skewed workers take their blocks over
        kill(l1)
        kill(l2)
        wait_for(lambda: alive(ahead, behind) and all(os.path.exists(lay.claim(b, 1))
                                                       for b in (1, 2)),
                 6 * lease + 10, "the skewed workers to take the dead holders' blocks")
        holders = {open(lay.claim(b, 1)).read() for b in (1, 2)}
        assert holders <= {"ahead", "behind"}
        assert ahead.wait(30) == 0 and behind.wait(30) == 0, "they finish and exit"
        # phase 3: a block held by a worker whose clock runs an hour ahead (so is its
        # heartbeat's mtime) is taken over by a normal worker once it dies, not an hour later
        gate = str(tmp_path / "gate")
        gsid = store.add_spec(Spec(kind="py", payload=cloudpickle.dumps(gated)))
        store.add_tasks(gsid, [dumps_args((i, gate), {}) for i in range(32, 48)])
        ahead2 = skewed(lay.run, "ahead2", 3600, str(tmp_path / "ahead2.json"))
        store.export(min_block=16)  # block 3
        wait_for(lambda: os.path.exists(lay.claim(3, 0)), 20, "block 3 claimed")
        assert open(lay.claim(3, 0)).read() == "ahead2"
        wait_for(lambda: any(type(r).__name__ == "Started" for r in records(lay, "ahead2")), 20,
                 "its first task to start")
        killpg(ahead2)
        t0 = time.monotonic()
        normal = spawn(lay.run, "normal")
        wait_for(lambda: os.path.exists(lay.claim(3, 1)), 6 * lease + 10, "block 3 taken over")
        assert time.monotonic() - t0 < 4 * lease + 2, "a dead holder is not kept for an hour"
        open(gate, "w").close()
        normal.join(30)
        assert normal.exitcode == 0
    finally:
        for p in (ahead, behind, ahead2):
            if p is not None:
                killpg(p)
        kill(l1)
        kill(l2)
    store.fold()
    assert store.counts()["succeeded"] == 48
    ends = Counter(r.task for _, r in journal_ends(lay) if r.outcome == Outcome.SUCCEEDED)
    assert max(ends.values()) == 1
    store.close()


# --- drain ------------------------------------------------------------------------------------------
def test_drain_signal_releases_the_block_for_others_at_once(tmp_path):
    lease = 30.0  # nobody waits for a lease to expire here
    store, sid, ids = make_run(tmp_path, value_of, [(i, 0.1) for i in range(20)], lease_s=lease,
                               workers=1, max_attempts=1, max_lost=1, export=False)
    store.export(min_block=20)  # one block of the twenty
    lay = store.layout
    out = str(tmp_path / "a.json")
    a = spawn(lay.run, "a", out, drain_signals=(signal.SIGTERM,))
    wait_for(lambda: sum(isinstance(r, Ended) for r in records(lay, "a")) >= 3, 20, "3 tasks")
    os.kill(a.pid, signal.SIGTERM)
    a.join(20)
    assert a.exitcode == 0
    sa = json.load(open(out))
    assert sa["exit"] == "stopped" and sa["released"] > 0
    assert list_claims(lay)[1].released
    t0 = time.monotonic()
    sb = work_loop(lay.run, "b")
    assert sb.takeovers == 1 and sb.exit == "finished"
    assert time.monotonic() - t0 < 5, "a released block is taken at once"
    store.fold()
    assert store.counts()["succeeded"] == 20
    for t in ids:
        row = store.tasks(ids=[t])[0]
        assert (row.failures, row.lost) == (0, 0), "released tasks spend no budget"
    store.close()


# --- waves: dependencies and retries --------------------------------------------------------------
def flaky(i, flag_dir):
    path = os.path.join(flag_dir, str(i))
    if i % 5 == 0 and not os.path.exists(path):
        open(path, "w").close()
        raise RuntimeError("first attempt fails on purpose")
    return i


def test_waves_release_dependents_and_retries(tmp_path):
    flags = tmp_path / "flags"
    flags.mkdir()
    lease = 2.0
    store, sid, first = make_run(tmp_path, flaky, [(i, str(flags)) for i in range(40)],
                                 lease_s=lease, workers=2, export=False, max_attempts=2,
                                 backoff=0.2)
    second = store.add_tasks(sid, [dumps_args((100 + i, str(flags)), {}) for i in range(10)],
                             after=list(first))
    ex = store.export()
    assert ex.tasks == 40 and not ex.final, "dependents and retries will follow"
    workers = [spawn(store.layout.run, f"w{i}") for i in range(2)]
    deadline = time.monotonic() + 60
    waves = 1
    while True:
        assert time.monotonic() < deadline, store.counts()
        ex = store.pump()
        waves += bool(ex.blocks)
        counts = store.counts()
        if counts["succeeded"] == 50:
            break
        time.sleep(0.1)
    for p in workers:
        p.join(30)
        assert p.exitcode == 0
    assert waves >= 3  # the first tasks, their retries, then their dependents
    assert [pickle.loads(store.result(t)[1]) for t in second] == list(range(100, 110))
    retried = [t for t in first if store.tasks(ids=[t])[0].failures == 1]
    assert len(retried) == 8
    assert min(store.tasks(ids=list(second))[i].started_at for i in range(10)) >= max(
        store.tasks(ids=list(first))[i].ended_at for i in range(40))
    store.close()


def test_recall_and_reap_from_the_catalog(tmp_path):
    store, sid, ids = make_run(tmp_path, value_of, [(i,) for i in range(100)], lease_s=0.3,
                               workers=2)
    assert store.claim("x", 5) == [], "offered tasks are left to workers"
    assert store.recall() == 100, "never claimed: taken back at once"
    leases = store.claim("x", 5)
    assert [lz.task for lz in leases] == list(ids[:5])
    # a dead holder's block is fenced by the coordinator's reap once its heartbeat stops
    w = FsWorker(store.layout.run, "gone", lease_s=0.3)
    w.register()
    store.export()
    blk = w.claim_block()
    assert blk is not None
    store.fold()
    assert store.counts()["claimed"] == 5 + len(blk.entries)
    assert store.reap() == 0, "first sight: nothing is dead yet"
    deadline = time.monotonic() + 10
    n = 0
    while not n:
        assert time.monotonic() < deadline
        time.sleep(0.1)
        store.heartbeat("x")  # x lives on: its leases stay
        n = store.reap()
    assert n == len(blk.entries)
    assert store.counts()["claimed"] == 5
    assert open(store.layout.claim(blk.block, 1)).read().startswith("!")
    w.close()
    store.close()


def test_large_results_travel_as_files_and_unsafe_runs_are_refused(tmp_path):
    import tasks_lib

    store, sid, ids = make_run(tmp_path, tasks_lib.big_bytes, [(i, 200_000) for i in range(3)],
                               lease_s=5.0, workers=1)
    work_loop(store.layout.run, "w")
    store.fold()
    for i, t in enumerate(ids):
        assert pickle.loads(store.result(t)[1]) == tasks_lib.big_bytes(i, 200_000)
    assert len(os.listdir(os.path.join(store.layout.run, "results"))) == 3
    assert os.path.getsize(store.layout.journal_of("w")) < 10_000, "not through the journal"
    os.chmod(store.layout.run, 0o770)
    with pytest.raises(UnsafeRun, match="chmod go-w"):
        work_loop(store.layout.run, "w2")
    store.close()


# --- metadata operations per task -----------------------------------------------------------------
STRACE_WORKERS = (
    "import sys, multiprocessing as mp\n"
    "sys.path.insert(0, {here!r})\n"
    "import test_fsjournal  # noqa: the task function\n"
    "from pipefarm.backends.array.worker_loop import work_loop\n"
    "from pipefarm.worker import LeaseRunner  # noqa\n"
    "import pipefarm.execute.py  # noqa\n"
    "ctx = mp.get_context('fork')\n"
    "ps = [ctx.Process(target=work_loop, args=(sys.argv[1], f'w{{i}}')) for i in range({w})]\n"
    "[p.start() for p in ps]; [p.join() for p in ps]\n"
)
META = {
    "open", "openat", "creat", "mkdir", "mkdirat", "rename", "renameat", "renameat2", "unlink",
    "unlinkat", "link", "linkat", "stat", "lstat", "newfstatat", "statx", "utimensat",
    "getdents64", "access", "faccessat", "faccessat2", "truncate", "ftruncate",
}


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_metadata_operations_per_task(tmp_path):
    """No-op tasks through 8 workers under strace: metadata operations on the run directory
    per task (every syscall that names a path or lists a directory under it)."""
    n = int(os.environ.get("PIPEFARM_META_TASKS", "50000"))
    store, sid, ids = make_run(tmp_path, value_of, [(i,) for i in range(n)], lease_s=60.0,
                               workers=8)
    run = store.layout.run
    log = str(tmp_path / "strace.log")
    t0 = time.monotonic()
    subprocess.run(
        ["strace", "-f", "-qq", "-o", log, "-e", "trace=%file,%desc",
         sys.executable, "-c", STRACE_WORKERS.format(here=HERE, w=8), run],
        check=True, timeout=600,
    )
    wall = time.monotonic() - t0
    on_run, total, fds = Counter(), Counter(), {}
    for line in open(log):
        m = re.match(r"(\d+)\s+(\w+)\((.*)", line)
        if not m or m.group(2) not in META:
            continue
        pid, name, rest = m.groups()
        total[name] += 1
        inside = run in rest
        if name in ("getdents64", "ftruncate"):
            inside = fds.get((pid, rest.split(",")[0]), False)
        if name in ("openat", "open"):
            fd = re.search(r"= (\d+)", line)
            if fd:
                fds[(pid, fd.group(1))] = inside
        if inside:
            on_run[name] += 1
    st = store.fold()
    assert st.ended == n and store.counts()["succeeded"] == n
    per_task = sum(on_run.values()) / n
    print(f"\n{n} no-op tasks, 8 workers, under strace: {wall:.1f} s ({n / wall:.0f} tasks/s); "
          f"run-dir metadata ops {sum(on_run.values())} = {per_task:.4f}/task {dict(on_run)}; "
          f"all metadata syscalls incl. interpreter start-up {sum(total.values())} = "
          f"{sum(total.values()) / n:.4f}/task")
    assert per_task <= 0.05
    store.close()

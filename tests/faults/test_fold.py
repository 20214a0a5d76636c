"""The catalog side of the shared-filesystem protocol (store/fold.py): folding journals into the
catalog idempotently, record ordering, the fold lock, exporting waves and repairing them."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import shutil
import signal
import socket
import threading
import time

import cloudpickle
import msgspec
import pytest

from pipefarm.backends.array.worker_loop import work_loop
from pipefarm.states import Outcome
from pipefarm.store import shared_fs as F
from pipefarm.store.journal import Claimed, Ended, JournalWriter, Started, frame
from pipefarm.store.shared_fs import (
    BlockFile,
    FsJournalStore,
    FsWorker,
    Layout,
    encode,
    read_wave,
    token_of,
)
from pipefarm.store.shared_fs import exporting as E
from pipefarm.store.sqlite import SQLiteStore
from pipefarm.task import Spec, dumps_args

T = 2_000_000.0  # a fixed "now" for folds that must be comparable


def triple(x):
    return 3 * x


def new_store(tmp_path, n=0, *, lease_s=5.0, workers=2, name="run", **spec_kw):
    run = tmp_path / name
    run.mkdir(mode=0o700)
    store = FsJournalStore(run, lease_s=lease_s, workers=workers)
    sid = store.add_spec(Spec(kind="py", payload=cloudpickle.dumps(triple), **spec_kw))
    if n:
        store.add_tasks(sid, [dumps_args((i,), {}) for i in range(n)])
    return store, sid


def dump(run) -> dict:
    """Everything the fold decides, from a catalog opened afresh."""
    c = SQLiteStore(run)
    try:
        out = {
            "tasks": c.db.execute(
                "SELECT id, state, attempt, failures, lost, token, worker, outcome, result,"
                " result_file, error, started_at, ended_at, claimed_at FROM tasks ORDER BY id"
            ).fetchall(),
            "attempts": sorted(c.db.execute(
                "SELECT task, attempt, worker, token, outcome, error, note FROM attempts"
            ).fetchall(), key=repr),
        }
        for table in ("fs_export", "fs_blocks", "fs_cursors"):
            out[table] = c.db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
        return out
    finally:
        c.close()


def run_workers(run, ids, **kw):
    """Run workers to completion in this process, one after another."""
    kw.setdefault("lease_s", 5.0)
    return [work_loop(run, w, **kw) for w in ids]


# ----------------------------------------------------------------------------------- block plans
def test_plan_blocks_sizes_and_tail():
    sizes = F.plan_blocks([1.0] * 100_000, workers=8)
    assert sum(sizes) == 100_000
    assert all(16 <= s <= 4096 for s in sizes[:-1]) and sizes[-1] >= 1
    assert max(sizes) == pytest.approx(100_000 / 64, abs=1)
    tail = sizes[-40:]
    assert tail == sorted(tail, reverse=True), "the tail shrinks"
    assert min(sizes) <= 16 + 1
    # per-task claims are far below one metadata operation per task
    assert len(sizes) < 100_000 / 500
    # few tasks: one per block, so that every worker gets some (8 x `sleep 2` on 2 workers)
    assert F.plan_blocks([1.0] * 10, workers=8) == [1] * 10
    assert F.plan_blocks([1.0] * 8, workers=2) == [1] * 8
    assert F.plan_blocks([1.0] * 64, workers=2) == [4] * 16


def test_plan_blocks_from_cost():
    # long tasks (cost read as seconds) go one per block, cheap ones keep the metadata floor
    sizes = F.plan_blocks([2.0] * 200, workers=2, mean_cost=2.0)
    assert sum(sizes) == 200 and max(sizes) <= 13 and sizes[-4:] == [1, 1, 1, 1]
    assert min(F.plan_blocks([1e-6] * 200_000, workers=8, mean_cost=1e-6)[:-1]) >= 16
    assert F.min_block_for(1000, 2, 0.25) == 4 and F.min_block_for(1000, 2, None) == 16


def test_plan_blocks_by_cost():
    weights = [100.0] * 10 + [1.0] * 1000  # ten expensive tasks first
    sizes = F.plan_blocks(weights, workers=4, min_block=1)
    assert sum(sizes) == 1010
    assert sizes[0] < 10, "expensive tasks are spread over several blocks"


def test_plan_blocks_max():
    assert max(F.plan_blocks([1.0] * 1_000_000, workers=1)) == 4096


# ----------------------------------------------------------------------------------- export
def test_export_writes_blocks_wave_and_specs(tmp_path):
    store, sid = new_store(tmp_path, 300, workers=2)
    ex = store.export()
    assert ex.tasks == 300 and ex.blocks >= 2 and ex.final
    lay = store.layout
    wave = read_wave(lay)
    assert wave.blocks == ex.last and wave.final
    seen = []
    for b in range(1, wave.blocks + 1):
        bf = msgspec.msgpack.decode(open(lay.block(b), "rb").read(), type=BlockFile)
        seen += [e[0] for e in bf.entries]
    assert seen == list(range(1, 301)), "every task once, in claim order"
    assert os.path.exists(lay.spec(sid))
    assert store.export().blocks == 0, "nothing left to export"
    assert store.counts()["ready"] == 300  # offered, not claimed
    store.close()


def test_export_orders_by_priority_and_groups_resources(tmp_path):
    from pipefarm.task import Resources

    store, sid = new_store(tmp_path)
    big = store.add_spec(Spec(kind="py", payload=cloudpickle.dumps(triple),
                              resources=Resources(cpus=4)))
    low = store.add_tasks(sid, [None] * 20, priority=0)
    high = store.add_tasks(sid, [None] * 20, priority=5)
    wide = store.add_tasks(big, [None] * 20, priority=1)
    store.export(min_block=20)
    lay = store.layout
    blocks = [msgspec.msgpack.decode(open(lay.block(b), "rb").read(), type=BlockFile)
              for b in range(1, read_wave(lay).blocks + 1)]
    assert [[e[0] for e in bf.entries] for bf in blocks] == [list(high), list(wide), list(low)]
    assert [(bf.cpus) for bf in blocks] == [1, 4, 1]
    assert read_wave(lay).classes == [(2, 2, 4, 0)]
    # a worker with one cpu leaves the 4-cpu block alone
    w = FsWorker(lay.run, "small", resources=Resources(cpus=1))
    w.register()
    got = [w.claim_block().block, w.claim_block().block, w.claim_block()]
    assert got == [1, 3, None]
    w.close()
    store.close()


def test_export_crash_between_catalog_and_files_is_repaired(tmp_path, monkeypatch):
    store, sid = new_store(tmp_path, 200, workers=2)
    real = E.write_block
    calls = []

    def flaky(layout, bf, fsync=True):
        calls.append(bf.block)
        if len(calls) == 2:
            raise OSError("simulated crash while writing block files")
        real(layout, bf, fsync)

    monkeypatch.setattr(E, "write_block", flaky)
    with pytest.raises(OSError):
        store.export()
    assert read_wave(store.layout).blocks == 0, "the wave is written last"
    monkeypatch.setattr(E, "write_block", real)
    ex = store.export()
    assert ex.repaired >= 1 and ex.blocks == 0
    wave = read_wave(store.layout)
    assert wave.final and wave.blocks >= 2
    run_workers(store.layout.run, ["w"])
    store.fold()
    assert store.counts()["succeeded"] == 200
    assert [pickle.loads(store.result(t)[1]) for t in (1, 200)] == [0, 597]
    store.close()


# ----------------------------------------------------------------------------------- folding
def test_fold_applies_everything_and_is_idempotent(tmp_path):
    store, sid = new_store(tmp_path, 500, workers=2)
    store.export()
    run = store.layout.run
    store.close()
    run_workers(run, ["a", "b"])
    # the same journals folded once in one copy, twice in another
    once, twice = tmp_path / "once", tmp_path / "twice"
    shutil.copytree(run, once)
    shutil.copytree(run, twice)
    c = SQLiteStore(once)
    st = F.fold(once, c, now=T)
    assert (st.claimed, st.started, st.ended, st.stale, st.torn) == (500, 500, 500, 0, [])
    c.close()
    c = SQLiteStore(twice)
    F.fold(twice, c, now=T)
    again = F.fold(twice, c, now=T)
    assert (again.records, again.ended) == (0, 0), "the cursors moved past everything"
    assert c.counts()["succeeded"] == 500
    c.close()
    assert dump(once) == dump(twice)


def _fold_and_die(run, ready_path):
    """Fold, but stop dead half-way through applying (inside the catalog transaction)."""
    real = SQLiteStore.finish

    def slow_finish(self, worker, outcomes, now=None):
        n = real(self, worker, outcomes, now)
        open(ready_path, "w").close()
        time.sleep(60)
        return n

    SQLiteStore.finish = slow_finish
    c = SQLiteStore(run)
    F.fold(run, c, now=T)


def test_fold_killed_midway_then_folded_again(tmp_path):
    store, sid = new_store(tmp_path, 400, workers=2)
    store.export()
    run = store.layout.run
    store.close()
    run_workers(run, ["a", "b"])
    ref = tmp_path / "reference"
    shutil.copytree(run, ref)
    c = SQLiteStore(ref)
    F.fold(ref, c, now=T)
    c.close()

    ready = str(tmp_path / "ready")
    p = mp.get_context("fork").Process(target=_fold_and_die, args=(run, ready))
    p.start()
    deadline = time.monotonic() + 30
    while not os.path.exists(ready):
        assert time.monotonic() < deadline and p.is_alive(), "the folder never got half-way"
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    # its lock file names a dead process on this host: taken over at once
    c = SQLiteStore(run)
    assert c.counts()["succeeded"] == 0, "nothing of the killed fold was committed"
    t0 = time.monotonic()
    st = F.fold(run, c, now=T, wait=0.0)
    assert not st.skipped and time.monotonic() - t0 < 5
    assert st.ended == 400
    c.close()
    assert dump(run) == dump(ref)


def test_claim_records_apply_before_a_zombies_late_end_in_the_same_pass(tmp_path):
    """Z holds block 1 and runs task t; Z stops; B takes block 1 over (epoch 1), reruns t;
    Z wakes and journals its end of t. One fold sees all of it: B's result is the task's,
    Z's attempt is lost and its late result stale."""
    store, sid = new_store(tmp_path, 3, workers=1)
    store.export(min_block=3)  # one block of the three
    lay = store.layout
    t1, t2, t3 = 1, 2, 3
    tok0 = {t: token_of(1, 0, t) for t in (t1, t2, t3)}
    tok1 = {t: token_of(1, 1, t) for t in (t1, t2, t3)}

    def ended(t, tok, value, at):
        return encode(Ended(t, tok, 1, int(Outcome.SUCCEEDED), at, at + 1,
                            result=pickle.dumps(value)))

    open(lay.claim(1, 0), "w").write("Z")
    open(lay.claim(1, 1), "w").write("B")
    with JournalWriter(lay.journal_of("Z")) as z:
        z.append([encode(Claimed(1, 0, "Z", 10.0)),
                  encode(Started(t1, tok0[t1], 1, "Z", 10.0)), ended(t1, tok0[t1], "t1 by Z", 10),
                  encode(Started(t2, tok0[t2], 1, "Z", 12.0))])
    with JournalWriter(lay.journal_of("B")) as b:
        b.append([encode(Claimed(1, 1, "B", 50.0, tasks=[t2, t3], lost=[t2])),
                  encode(Started(t2, tok1[t2], 2, "B", 50.0)), ended(t2, tok1[t2], "t2 by B", 50),
                  encode(Started(t3, tok1[t3], 1, "B", 52.0)), ended(t3, tok1[t3], "t3 by B", 52)])
    with JournalWriter(lay.journal_of("Z")) as z:  # the zombie wakes up
        z.append([ended(t2, tok0[t2], "t2 by the zombie", 60)])
    st = store.fold(now=T)
    assert (st.lost, st.stale) == (1, 1)
    assert [pickle.loads(store.result(t)[1]) for t in (t1, t2, t3)] == ["t1 by Z", "t2 by B", "t3 by B"]
    outcomes = [(a.worker, a.outcome) for a in store.attempts(t2)]
    assert ("Z", "lost") in outcomes and ("Z", "stale") in outcomes and ("B", "succeeded") in outcomes
    row = store.tasks(ids=[t2])[0]
    assert (row.state, row.lost, row.worker) == ("succeeded", 1, "B")
    assert store.counts()["succeeded"] == 3
    store.close()


def test_a_result_folded_first_is_never_overwritten(tmp_path):
    """Across passes the catalog is the order: the zombie's end is folded before the
    takeover is visible, so it is the result, and the takeover's later end is stale."""
    store, sid = new_store(tmp_path, 1, workers=1)
    store.export()
    lay = store.layout
    t, tok0, tok1 = 1, token_of(1, 0, 1), token_of(1, 1, 1)
    open(lay.claim(1, 0), "w").write("Z")
    with JournalWriter(lay.journal_of("Z")) as z:
        z.append([encode(Claimed(1, 0, "Z", 1.0)), encode(Started(t, tok0, 1, "Z", 1.0)),
                  encode(Ended(t, tok0, 1, 0, 1.0, 2.0, result=pickle.dumps("first")))])
    store.fold(now=T)
    open(lay.claim(1, 1), "w").write("B")
    with JournalWriter(lay.journal_of("B")) as b:
        b.append([encode(Claimed(1, 1, "B", 5.0, tasks=[t], lost=[t])),
                  encode(Ended(t, tok1, 2, 0, 5.0, 6.0, result=pickle.dumps("second")))])
    st = store.fold(now=T)
    assert st.stale == 1 and st.ended == 0
    assert pickle.loads(store.result(t)[1]) == "first"
    assert [a.outcome for a in store.attempts(t)] == ["stale", "succeeded"]
    store.close()


def test_torn_tail_stops_the_fold_there_until_repaired(tmp_path):
    store, sid = new_store(tmp_path, 100, workers=1)
    store.export()
    lay = store.layout
    run_workers(lay.run, ["w"])
    size = os.path.getsize(lay.journal_of("w"))
    with open(lay.journal_of("w"), "ab") as fh:  # a crash half-way through an append
        fh.write(frame([b"x" * 200])[:60])
    st = store.fold(now=T)
    assert st.torn == ["w.log"] and st.ended == 100
    cursor = store.catalog.db.execute("SELECT offset FROM fs_cursors WHERE journal='w.log'").fetchone()
    assert cursor == (size,)
    assert store.fold(now=T).records == 0
    w = JournalWriter(lay.journal_of("w"))  # its owner reopens it: the tail is cut
    assert w.repaired == 60
    w.append([encode(Started(1, 12345, 9, "w", 1.0))])
    w.close()
    st = store.fold(now=T)
    assert st.torn == [] and st.records == 1
    store.close()


def test_fold_stats_count_unknown_blocks(tmp_path):
    store, sid = new_store(tmp_path, 1)
    with JournalWriter(store.layout.journal_of("x")) as j:
        j.append([encode(Claimed(99, 0, "x", 1.0)), b"\xc1 not msgpack"])
    st = store.fold(now=T)
    assert st.unknown == 2 and st.records == 1
    store.close()


# ----------------------------------------------------------------------------------- the lock
def test_fold_lock_excludes_and_hands_over(tmp_path):
    lay = Layout(tmp_path)
    lay.make()
    a = F.FoldLock(lay, "a", lease_s=30.0)
    b = F.FoldLock(lay, "b", lease_s=30.0)
    assert a.acquire() and a.held
    assert not b.acquire(wait=0.2)
    a.release()
    assert b.acquire() and b.n == 2
    assert a.acquire(wait=0) is False
    b.release()


def test_fold_lock_of_a_dead_process_on_this_host_is_taken_at_once(tmp_path):
    lay = Layout(tmp_path)
    lay.make()
    p = mp.get_context("fork").Process(target=time.sleep, args=(0,))
    p.start()
    p.join()
    with open(f"{lay.foldlock}/7", "w") as fh:
        fh.write(f"ghost {socket.gethostname()} {p.pid}\n")
    b = F.FoldLock(lay, "b", lease_s=3600.0)
    assert b.acquire(wait=0) and b.n == 8


def test_fold_lock_stale_by_mtime_and_live_one_kept(tmp_path):
    lay = Layout(tmp_path)
    lay.make()
    lease = 0.4
    # a holder on another host that stopped touching its lock: taken after watching it
    with open(f"{lay.foldlock}/1", "w") as fh:
        fh.write("elsewhere otherhost 1\n")
    old = time.time() - 100
    os.utime(f"{lay.foldlock}/1", (old, old))
    b = F.FoldLock(lay, "b", lease_s=lease)
    t0 = time.monotonic()
    assert b.acquire(wait=5.0)
    assert time.monotonic() - t0 >= lease / 2, "a lock is never broken at first sight"
    # a live holder keeps it, however long the newcomer waits
    stop = threading.Event()

    def keep():
        while not stop.wait(0.02):
            b.refresh()

    th = threading.Thread(target=keep)
    th.start()
    c = F.FoldLock(lay, "c", lease_s=lease)
    try:
        assert not c.acquire(wait=3 * lease)
    finally:
        stop.set()
        th.join()
    # the holder stops: the newcomer takes over, and the old holder notices
    assert c.acquire(wait=5.0) and c.n == 3
    b._touched = float("-inf")  # as if b had been asleep
    assert not b.refresh() and not b.held


def test_store_queries_read_as_is_while_another_process_folds(tmp_path):
    store, sid = new_store(tmp_path, 5)
    lay = store.layout
    other = F.FoldLock(lay, "other", lease_s=30.0)
    store.close()  # releases its lock
    assert other.acquire()
    s2 = FsJournalStore(lay.run, lease_s=30.0)
    assert s2.counts()["ready"] == 5  # no fold, no error
    from pipefarm.store.sqlite import StoreError

    s2._lock.acquire = lambda wait=0.0: False  # do not wait 60 s for it
    with pytest.raises(StoreError, match="another process folds"):
        s2.claim("w", 1)
    s2.close()
    other.release()

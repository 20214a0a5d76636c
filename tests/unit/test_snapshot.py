"""observe/snapshot.py: the shared read model, on real runs with known outcomes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tasks_lib
from cli_lib import PF

import pipefarm as pf
from pipefarm.observe import snapshot as S
from pipefarm.observe.status import status_report
from pipefarm.states import Outcome, State
from pipefarm.store.sqlite.query import CatalogQuery


@pytest.fixture(scope="module")
def known(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 successes (keyed), 3 failures (2 signatures), 1 timed-out task; 2 workers."""
    path = tmp_path_factory.mktemp("snap") / "r"
    run = pf.Run.create(path)
    run.map(tasks_lib.square, range(6), keys=[f"sq{i}" for i in range(6)])
    run.map(tasks_lib.raise_value_error, range(2))
    run.map(tasks_lib.explode_with, [7])
    run.map(tasks_lib.sleep_forever, [30.0], timeout=0.5)
    run.execute(workers=2, progress=False)
    run.close()
    return path


def test_overview_matches_status(known: Path) -> None:
    ov = S.overview(known)
    with pf.Run.open(known) as run:
        rep = status_report(run)
    assert ov.counts == rep["counts"] and ov.total == rep["total"] == 10
    assert ov.counts["succeeded"] == 6 and ov.counts["failed"] == 4
    assert set(ov.counts) == {s.label for s in State}
    assert ov.done == 10 and ov.live is False and ov.eta_s is None
    assert abs(ov.now - time.time()) < 60


def test_attempt_totals_has_every_outcome(known: Path) -> None:
    totals = S.attempt_totals(known)
    assert set(totals) == {o.label for o in Outcome}
    assert totals["succeeded"] == 6 and totals["failed"] == 3 and totals["timed_out"] == 1


def test_failure_groups(known: Path) -> None:
    groups = S.failure_groups(known)
    sigs = {g.signature: g.count for g in groups}
    assert sum(sigs.values()) == 4 and len(groups) == 3
    assert sigs["timed out"] == 1
    assert any("ValueError" in s or "bad value" in s for s in sigs) and max(sigs.values()) == 2
    assert S.failure_groups(known, limit=1)[0].count == 2


def test_workers_and_their_attempts(known: Path) -> None:
    ws = S.workers(known)
    assert ws and sum(w.done for w in ws) == 10
    assert all(w.running == 0 for w in ws)
    assert all(w.state in ("alive", "stale", "gone") for w in ws)
    assert any(w.host for w in ws)


def test_durations_throughput_stream(known: Path) -> None:
    ds = {d.name: d for d in S.durations(known)}
    assert ds["square"].count == 6
    sq = ds["square"]
    assert sq.p50 <= sq.p95 <= sq.max and sum(sq.counts) == 6 and len(sq.edges) == len(sq.counts) + 1
    tp = S.throughput(known, buckets=5)
    assert len(tp) == 5 and sum(n for _, n in tp) == 10
    assert [t for t, _ in tp] == sorted(t for t, _ in tp)
    bars = S.task_stream(known)
    assert len(bars) == 10 and {b.outcome for b in bars} == {"succeeded", "failed", "timed_out"}
    assert all(b.end is not None and b.end >= b.start for b in bars)
    assert len(S.task_stream(known, limit=3)) == 3
    assert S.task_stream(known, since=time.time() + 60) == []


def test_snapshot_is_json_and_one_payload(known: Path) -> None:
    snap = S.snapshot(known)
    text = json.dumps(snap)
    assert set(snap) == {"overview", "running", "workers", "failures"}
    assert json.loads(text)["overview"]["counts"]["succeeded"] == 6
    assert snap["running"] == [] and snap["failures"][0]["count"] == 2


def test_running_tasks_of_a_live_run(tmp_path: Path) -> None:
    path = tmp_path / "r"
    with pf.Run.create(path) as run:
        run.submit_cmd("sleep 30", keys=["napper"])
        run.submit_cmd("sleep 30")
    proc = subprocess.Popen([*PF, "run", str(path), "--no-progress", "--workers", "2"],
                            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while len(S.running(path)) < 2:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        rs = S.running(path)
        assert "napper" in {r.label for r in rs} and all(r.worker for r in rs)
        assert all(r.elapsed_s >= 0 for r in rs)
        ov = S.overview(path)
        assert ov.live and ov.counts["running"] == 2
        ws = S.workers(path)
        assert sum(w.running for w in ws) == 2 and any(w.state == "alive" for w in ws)
        assert sum(b.outcome == "running" for b in S.task_stream(path)) == 2
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def test_missing_run_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        S.overview(tmp_path / "nothing")


def test_array_heartbeat_files_are_workers(known: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "arr"
    shutil.copytree(known, run)
    hb = run / "fs" / "hb"
    hb.mkdir(parents=True)
    (hb / "node7-4242-abc123").touch()
    (hb / "catalog").touch()
    old = hb / "node8-99-def456"
    old.touch()
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    with CatalogQuery.open(run) as q:  # no fold: the copy has no journals to fold
        ws = {w.id: w for w in S._workers(run, q)}
    assert ws["node7-4242-abc123"].state == "alive" and ws["node7-4242-abc123"].host == "node7"
    assert ws["node7-4242-abc123"].pid == 4242
    assert ws["node8-99-def456"].state == "stale" and "catalog" not in ws


def test_views_index_only_while_nothing_executes(tmp_path: Path) -> None:
    """A view builds the views' index on an idle run; executing drops it first, so no commit
    of the run pays for it (W1 6-11 % slower with it kept up)."""
    run = pf.Run.create(tmp_path / "r")
    run.map(tasks_lib.square, range(20))

    def indexed() -> bool:
        with CatalogQuery.open(run.path) as q:
            return q.has_views_index()

    assert not indexed()
    S.snapshot(run.path)
    assert indexed()
    seen: list[bool] = []
    run.execute(workers=1, progress=False, on_progress=lambda counts: seen.append(indexed()))
    assert seen and not any(seen)  # dropped before the first task ran
    assert S.overview(run.path).counts["succeeded"] == 20 and indexed()
    run.close()


def test_views_cache_keeps_an_idle_runs_aggregates_by_catalog_version(tmp_path: Path) -> None:
    """A finished run's full-scan aggregates are kept in RUN/views-cache.msgpack for the next
    process; once the run changes, the kept value is not used."""
    run = pf.Run.create(tmp_path / "r")
    run.map(tasks_lib.square, range(10))
    run.execute(workers=2, progress=False)
    done = sum(w.done for w in S.workers(run.path))
    assert done == 10 and (run.path / S.VIEWS_CACHE).exists()
    code = ("import sys; from pipefarm.observe import snapshot as S; "
            "print(S._kept(S.Path(sys.argv[1]), 'ended_by_worker', "
            "S.catalog_version(S.Path(sys.argv[1]))))")
    kept = subprocess.run([sys.executable, "-c", code, str(run.path)], capture_output=True,
                          text=True, check=True).stdout
    assert "None" != kept.strip() and sum(eval(kept).values()) == 10  # noqa: S307 (our own repr)
    run.map(tasks_lib.square, range(5))
    run.execute(workers=2, progress=False)
    S._memo.clear()
    assert sum(w.done for w in S.workers(run.path)) == 15
    run.close()

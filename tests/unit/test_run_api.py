"""The Run API: creating and opening runs, submission, results, dependencies, ordering, cancel,
progress callbacks, and the sequential backend as the reference for the local one."""

from __future__ import annotations

import os
import stat

import pytest
import tasks_lib as T

import pipefarm as pf

RESULT_COLUMNS = ["task_id", "key", "state", "attempts", "exit_code", "result", "error",
                  "started_at", "ended_at", "duration_s", "worker", "peak_memory",
                  "outcome"]


def _log(path) -> list[str]:
    return path.read_text().split() if path.exists() else []


# --- create / open ---------------------------------------------------------------------------------
def test_create_open_semantics(tmp_path):
    d = tmp_path / "a" / "b" / "run"
    run = pf.Run.create(d)
    assert (d / "catalog.db").exists()
    tid = run.submit(T.square, 4)
    run.close()
    with pytest.raises(FileExistsError):
        pf.Run.create(d)
    again = pf.Run.create(d, exist_ok=True)
    assert len(again) == 1 and again.status()["ready"] == 1
    again.close()
    with pytest.raises(FileNotFoundError):
        pf.Run.open(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()
    with pf.Run.open(d) as run:
        assert run.execute(workers=1, progress=False).ok
        assert run.result(tid) == 16
    with pf.Run.open(d) as run:  # a finished run reopens with its results
        assert run.result(tid) == 16
        assert run.execute(workers=1, progress=False).attempts == 0


def test_run_directory_is_private(tmp_path):
    old = os.umask(0)
    try:
        d = tmp_path / "run"
        pf.Run.create(d).close()
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        # an existing directory others can write is refused with the fix, its mode untouched
        e = tmp_path / "existing"
        e.mkdir(mode=0o777)
        with pytest.raises(pf.UnsafeRun, match="chmod go-w"):
            pf.Run.create(e)
        assert stat.S_IMODE(e.stat().st_mode) == 0o777
        assert not (e / "catalog.db").exists()
        # one only its owner can write is used as it is
        f = tmp_path / "readable"
        f.mkdir(mode=0o755)
        pf.Run.create(f).close()
        assert stat.S_IMODE(f.stat().st_mode) == 0o755
    finally:
        os.umask(old)


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777, 0o720])
def test_open_refuses_writable_by_others(tmp_path, mode):
    d = tmp_path / "run"
    pf.Run.create(d).close()
    os.chmod(d, mode)
    with pytest.raises(pf.UnsafeRun, match="chmod go-w"):
        pf.Run.open(d)
    with pytest.raises(pf.UnsafeRun):
        pf.Run.create(d, exist_ok=True)
    os.chmod(d, 0o755)  # readable by others is fine; writable is not
    pf.Run.open(d).close()


# --- submission ------------------------------------------------------------------------------------
def test_map_submit_submit_task_and_results_table(tmp_path):
    run = pf.Run.create(tmp_path / "run")
    squares = run.map(T.square, range(5))
    assert list(squares) == [1, 2, 3, 4, 5]
    sums = run.map(T.add, [1, 2, 3], [10, 20, 30], keys=["x", "y", "z"])
    assert list(sums) == [6, 7, 8]
    one = run.submit(T.add, 1, 2, c=3)
    keyed = run.submit_task(T.add, (5,), {"b": 6}, key="eleven")
    assert (one, keyed) == (9, 10)
    assert len(run) == 10
    assert run.status()["ready"] == 10
    with pytest.raises(pf.TaskNotFinished):
        run.result(one)
    pending = run.results()
    assert pending.column_names == RESULT_COLUMNS
    assert set(pending.column("state").to_pylist()) == {"ready"}

    summary = run.execute(workers=2, progress=False)
    assert summary.ok and summary.total == 10 and summary.attempts == 10
    table = run.results()
    assert table.column_names == RESULT_COLUMNS
    assert table.num_rows == 10
    rows = table.to_pylist()
    assert [r["task_id"] for r in rows] == list(range(1, 11))
    assert [r["result"] for r in rows] == [0, 1, 4, 9, 16, 11, 22, 33, 6, 11]
    assert [r["key"] for r in rows] == [None] * 5 + ["x", "y", "z", None, "eleven"]
    for r in rows:
        assert r["state"] == "succeeded" and r["attempts"] == 1 and r["error"] is None
        assert r["ended_at"] >= r["started_at"] > 0
        assert r["duration_s"] == pytest.approx(r["ended_at"] - r["started_at"])
        assert r["worker"]
    assert run.result(keyed) == 11


def test_results_table_records_failures(tmp_path):
    run = pf.Run.create(tmp_path / "run")
    bad = run.submit(T.raise_value_error, 3)
    good = run.submit(T.ident, "fine")
    run.execute(workers=1, progress=False)
    rows = {r["task_id"]: r for r in run.results().to_pylist()}
    assert rows[bad]["state"] == "failed" and rows[bad]["result"] is None
    assert "ValueError: bad value 3" in rows[bad]["error"]
    assert rows[good]["state"] == "succeeded" and rows[good]["result"] == "fine"


# --- dependencies ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_dependency_chain_runs_in_order(tmp_path):
    log = tmp_path / "log"
    run = pf.Run.create(tmp_path / "run")
    a = run.submit_task(T.log_start, (str(log), "a", 0.15))
    b = run.submit_task(T.log_start, (str(log), "b", 0.15), after=[a])
    c = run.submit_task(T.log_start, (str(log), "c", 0.15), after=[b])
    fan = run.map(T.log_start, [str(log)] * 3, ["d1", "d2", "d3"], [0.15] * 3, after=[a, b])
    assert run.status()["blocked"] == 5 and run.status()["ready"] == 1
    assert run.execute(workers=2, progress=False).ok
    order = _log(log)
    assert order[:2] == ["a", "b"] and sorted(order[2:]) == ["c", "d1", "d2", "d3"]
    rows = {r["task_id"]: r for r in run.results().to_pylist()}
    assert rows[b]["started_at"] >= rows[a]["ended_at"]
    assert rows[c]["started_at"] >= rows[b]["ended_at"]
    for t in fan:
        assert rows[t]["started_at"] >= rows[b]["ended_at"]


def test_chain_of_instant_tasks_completes_in_one_execute(tmp_path):
    run = pf.Run.create(tmp_path / "run")
    ids = [run.submit(T.ident, 0)]
    for i in range(1, 8):
        ids.append(run.submit_task(T.ident, (i,), after=[ids[-1]]))
    summary = run.execute(workers=1, progress=False)
    assert run.status()["claimed"] == 0
    assert summary.ok, summary
    assert [run.result(t) for t in ids] == list(range(8))


@pytest.mark.slow
def test_failed_dependency_skips_then_retry_revives(tmp_path):
    log, flag = tmp_path / "log", tmp_path / "flag"
    run = pf.Run.create(tmp_path / "run")
    a = run.submit_task(T.fail_first_time, (str(flag), "A", 0.15))
    b = run.submit_task(T.log_start, (str(log), "b", 0.15), after=[a])
    c = run.submit_task(T.log_start, (str(log), "c", 0.15), after=[b])
    run.submit_task(T.log_start, (str(log), "free"))
    summary = run.execute(workers=2, progress=False)
    assert summary.counts["failed"] == 1 and summary.counts["skipped"] == 2
    assert summary.counts["succeeded"] == 1 and not summary.ok
    assert _log(log) == ["free"]
    with pytest.raises(pf.TaskFailed) as ei:
        run.result(c)
    assert ei.value.state == "skipped"
    # a new task after a failed one is skipped at once
    late = run.submit_task(T.log_start, (str(log), "late", 0.15), after=[a])
    assert run.tasks(ids=[late])[0].state == "skipped"
    with pytest.raises(pf.SubmissionError):
        run.submit_task(T.square, (1,), after=[999])

    assert run.retry() == 1  # the failed task only; its dependents come back with it
    counts = run.status()
    assert counts["ready"] == 1 and counts["blocked"] == 3 and counts["skipped"] == 0, counts
    assert run.execute(workers=2, progress=False).ok
    assert run.result(a) == "A" and run.result(c) == "c" and run.result(late) == "late"
    order = _log(log)
    assert order[0] == "free" and sorted(order[1:]) == ["b", "c", "late"]
    assert order.index("b") < order.index("c")
    assert [x.outcome for x in run.attempts(a)] == ["failed", "succeeded"]
    assert run.retry() == 0


@pytest.mark.slow
def test_no_task_is_dispatched_twice(tmp_path):
    # a task leased past the claim cursor must not be leased again once a dependency's commit
    # resets the cursor (regression: it ran twice, the first result recorded as stale)
    log = tmp_path / "log"
    run = pf.Run.create(tmp_path / "run")
    a = run.submit_task(T.log_start, (str(log), "a", 0.1))
    run.submit_task(T.log_start, (str(log), "b", 0.1), after=[a])
    long = run.submit_task(T.log_start, (str(log), "long", 1.0))
    summary = run.execute(workers=2, progress=False)
    assert summary.ok
    assert sorted(_log(log)) == ["a", "b", "long"]
    assert [x.outcome for x in run.attempts(long)] == ["succeeded"]
    assert summary.attempts == 3


# --- ordering --------------------------------------------------------------------------------------
def test_priority_then_cost_order_with_one_worker(tmp_path):
    log = tmp_path / "log"
    run = pf.Run.create(tmp_path / "run")
    spec = [  # (label, priority, cost)
        ("p0", 0, None), ("p5_c1", 5, 1.0), ("p1", 1, None), ("p5_c9", 5, 9.0),
        ("p3", 3, None), ("p5_c1_late", 5, 1.0), ("neg", -2, 100.0), ("p1_c2", 1, 2.0),
    ]
    for label, prio, cost in spec:
        run.map(T.log_start, [str(log)], [label], priority=prio, cost=cost)
    assert run.execute(workers=1, progress=False).ok
    assert _log(log) == ["p5_c9", "p5_c1", "p5_c1_late", "p3", "p1_c2", "p1", "p0", "neg"]


# --- cancel ----------------------------------------------------------------------------------------
def test_cancel(tmp_path):
    log = tmp_path / "log"
    run = pf.Run.create(tmp_path / "run")
    ids = run.map(T.log_start, [str(log)] * 4, ["t1", "t2", "t3", "t4"])
    child = run.submit_task(T.log_start, (str(log), "child"), after=[ids[1]])
    assert run.cancel([ids[1]]) == 1
    assert run.cancel([ids[1]]) == 0
    counts = run.status()
    assert counts["cancelled"] == 1 and counts["skipped"] == 1 and counts["ready"] == 3
    assert run.execute(workers=2, progress=False).counts["succeeded"] == 3
    assert sorted(_log(log)) == ["t1", "t3", "t4"]
    with pytest.raises(pf.TaskFailed) as ei:
        run.result(ids[1])
    assert ei.value.state == "cancelled"
    assert run.tasks(ids=[child])[0].state == "skipped"
    assert run.cancel() == 0  # nothing unfinished is left to cancel

    more = run.map(T.square, range(5))
    assert run.cancel() == 5
    assert run.execute(workers=2, progress=False).attempts == 0
    assert {t.state for t in run.tasks(ids=more)} == {"cancelled"}


# --- progress --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["local", "sequential"])
def test_on_progress_gets_counts(tmp_path, backend):
    calls: list[dict] = []
    run = pf.Run.create(tmp_path / "run")
    run.map(T.sleep_then, range(30), [0.005] * 30)
    run.execute(workers=2, backend=backend, progress=False, on_progress=lambda c: calls.append(dict(c)))
    assert calls
    for c in calls:
        assert {"ready", "succeeded", "failed"} <= set(c)
        assert all(isinstance(v, int) and v >= 0 for v in c.values())
    assert calls[-1]["succeeded"] == 30 and calls[-1]["ready"] == 0
    done = [c["succeeded"] for c in calls]
    assert done == sorted(done)


# --- sequential is the reference ------------------------------------------------------------------
def _workload(run: pf.Run, tmp) -> None:
    run.map(T.square, range(6), keys=[f"sq{i}" for i in range(6)])
    run.submit_task(T.raise_value_error, (7,), key="bad")
    run.submit_task(T.count_then, (str(tmp / "counter"), 2, "second"), retries=2, backoff=0.05,
                    key="flaky")
    run.submit_task(T.raise_value_error, (9,), retries=1, backoff=0.05, key="hopeless")
    root = run.submit_task(T.sleep_then, (81, 0.15), key="root")
    run.submit_task(T.add, (1,), {"b": 2}, after=[root], key="after_root")
    run.submit_task(T.ident, ("x",), after=[7], key="after_bad")


def _outcomes(run: pf.Run, summary) -> dict:
    rows = run.results().to_pylist()
    return {
        "counts": summary.counts,
        "rows": [(r["task_id"], r["key"], r["state"], r["attempts"], r["result"],
                  [ln.split(";")[0] for ln in (r["error"] or "").strip().splitlines()[-1:]])
                 for r in rows],
        "attempts": {r["key"]: [a.outcome for a in run.attempts(r["task_id"])] for r in rows},
        "values": {r["key"]: run.result(r["task_id"]) for r in rows if r["state"] == "succeeded"},
    }


def test_sequential_matches_local(tmp_path):
    outcomes = {}
    for backend in ("sequential", "local"):
        base = tmp_path / backend
        base.mkdir()
        with pf.Run.create(base / "run") as run:
            _workload(run, base)
            outcomes[backend] = _outcomes(run, run.execute(workers=2, backend=backend,
                                                           progress=False))
    seq, loc = outcomes["sequential"], outcomes["local"]
    assert seq["counts"] == loc["counts"]
    assert seq["rows"] == loc["rows"]
    assert seq["attempts"] == loc["attempts"]
    assert seq["values"] == loc["values"]
    # and the shared expectations themselves
    att = loc["attempts"]
    assert att["flaky"] == ["failed", "succeeded"]
    assert att["hopeless"] == ["failed", "failed"]
    assert att["bad"] == ["failed"] and att["after_bad"] == []
    assert att["root"] == att["after_root"] == ["succeeded"]
    assert loc["counts"]["succeeded"] == 9 and loc["counts"]["failed"] == 2
    assert loc["counts"]["skipped"] == 1
    values = loc["values"]
    assert values["after_root"] == 3 and values["root"] == 81 and values["flaky"] == "second"
    assert values["sq5"] == 25
    rows = {r[1]: r for r in loc["rows"]}
    assert rows["hopeless"][5] == ["ValueError: bad value 9"]


@pytest.mark.parametrize("backend", [
    "local",
    "sequential",
])
@pytest.mark.slow
def test_timeout_outcome_same_on_both_backends(tmp_path, backend):
    with pf.Run.create(tmp_path / "run") as run:
        slow = run.submit_task(T.sleep_forever, (30.0,), timeout=0.5, retries=1, backoff=0.05)
        after = run.submit_task(T.ident, ("never",), after=[slow])
        last = run.submit(T.square, 12)
        summary = run.execute(workers=2, backend=backend, progress=False)
        assert summary.counts["failed"] == 1 and summary.counts["skipped"] == 1
        assert run.result(last) == 144
        assert run.tasks(ids=[after])[0].state == "skipped"
        attempts = run.attempts(slow)
        assert [a.outcome for a in attempts] == ["timed_out", "timed_out"]
        assert all("timed out after 0.5 s" in (a.error or "") for a in attempts)

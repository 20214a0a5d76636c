"""Issue 8, "The habits users bring": results that join back to their inputs, streamed exports,
private result files, and the views (status, failures, progress, list, show).

Every CLI check runs real ``pipefarm`` processes on real run directories.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tasks_lib as T
from cli_lib import PF, ok, one_line_usage_error, pf_cli

import pipefarm as pf


def background_run(run: str, cwd: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*PF, "run", run, "--no-progress", *extra], cwd=cwd,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def counts_of(run: Path) -> dict[str, int]:
    with pf.Run.open(run) as r:
        return r.store.counts()


def snapshot(run: Path) -> dict[str, tuple[int, str]]:
    """Mode and content hash of every file in a run (the views must change none)."""
    out = {}
    for p in sorted(run.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(run))] = (p.stat().st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


# === 4. results join back to their inputs ===========================================================
def sweep(tmp_path: Path) -> list[dict[str, str]]:
    rows = [{"alpha": "0.1", "beta": "x y", "note": "first"},
            {"alpha": "0.2", "beta": "z", "note": "second"},
            {"alpha": "0.3", "beta": "w", "note": "third"}]
    with open(tmp_path / "params.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["alpha", "beta", "note"])
        w.writeheader()
        w.writerows(rows)
    ok("submit", "r", "--from-csv", "params.csv", "--", "sh", "-c",
       'echo "noise"; echo "loss={alpha}"; [ "{alpha}" != 0.3 ]', cwd=tmp_path)
    p = pf_cli("run", "r", "--no-progress", "-w", "2", cwd=tmp_path)
    assert p.returncode == 1, p.stderr  # 0.3 fails
    return rows


@pytest.mark.slow
def test_command_results_carry_their_source_row_command_and_stdout(tmp_path: Path) -> None:
    rows = sweep(tmp_path)
    out = list(csv.DictReader(io.StringIO(ok("results", "r", "--format", "csv", cwd=tmp_path))))
    assert [{k[len("param_"):]: v for k, v in r.items() if k.startswith("param_")} for r in out] == rows
    for r, src in zip(out, rows, strict=True):
        assert r["command"] == f"sh -c 'echo \"noise\"; echo \"loss={src['alpha']}\"; [ \"{src['alpha']}\" != 0.3 ]'"
        assert r["stdout_tail"] == f"noise\nloss={src['alpha']}\n"  # failed ones too
        assert r["started_at"].endswith("Z")  # a UTC timestamp, not a float epoch
    assert [r["state"] for r in out] == ["succeeded", "succeeded", "failed"]

    ok("results", "r", "-o", "r.parquet", cwd=tmp_path)
    t = pq.read_table(tmp_path / "r.parquet")
    for c in ("started_at", "ended_at"):
        assert t.schema.field(c).type == pa.timestamp("us", tz="UTC")
    assert t.column_names[-5:] == ["command", "stdout_tail", "param_alpha", "param_beta", "param_note"]
    got = t.to_pylist()
    assert abs(time.time() - got[0]["ended_at"].timestamp()) < 300


@pytest.mark.slow
def test_json_is_one_array_jsonl_one_object_a_line_and_dash_is_stdout(tmp_path: Path) -> None:
    sweep(tmp_path)
    arr = json.loads(ok("results", "r", "--format", "json", "-o", "-", cwd=tmp_path))
    assert isinstance(arr, list) and [r["param_alpha"] for r in arr] == ["0.1", "0.2", "0.3"]
    lines = ok("results", "r", "--format", "jsonl", cwd=tmp_path).splitlines()
    assert [json.loads(x) for x in lines] == arr
    ok("results", "r", "-o", "a.json", cwd=tmp_path)
    ok("results", "r", "-o", "a.jsonl", cwd=tmp_path)
    assert json.loads((tmp_path / "a.json").read_text()) == arr
    assert [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()] == arr
    assert not (tmp_path / "-").exists()
    # an empty run is an empty array, not nothing
    ok("submit", "e", "--array", "0", "--", "true", cwd=tmp_path)
    ok("cancel", "e", cwd=tmp_path)
    assert len(json.loads(ok("results", "e", "--format", "json", cwd=tmp_path))) == 1


# === 7. exports stream; large results are private ===================================================
def test_export_is_streamed_in_bounded_batches(tmp_path: Path) -> None:
    from pipefarm.observe import export as R

    size = 200 * 1024  # past the inline limit: each result is a file in RUN/results
    run = pf.Run.create(tmp_path / "r")
    run.map(T.big_bytes, range(120), [size] * 120)
    run.execute(workers=2, progress=False)
    batches = list(R.result_batches(run))
    assert len(batches) > 1
    for b in batches:
        assert b.column("result").nbytes <= R.EXPORT_BATCH_BYTES + size
    assert sum(b.num_rows for b in batches) == 120
    assert pa.Table.from_batches(batches).column("result").to_pylist() == [
        T.big_bytes(i, size) for i in range(120)]
    run.close()


@pytest.mark.slow
def test_export_peak_memory_stays_flat(tmp_path: Path) -> None:
    """150 MB of results: the export's peak RSS stays far below the results' size (before
    the change it held the whole table and its converted copy: ~5x the results)."""
    run = pf.Run.create(tmp_path / "r")
    run.map(T.big_bytes, range(750), [200 * 1024] * 750)
    run.execute(workers=2, progress=False)
    run.close()
    probe = ("import resource, subprocess, sys;"
             "p = subprocess.run(sys.argv[1:]);"
             "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    for fmt in ("parquet", "csv", "json"):
        out = subprocess.run([sys.executable, "-c", probe, *PF, "results", "r", "-o", f"x.{fmt}"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
        rc, kib = map(int, out.stdout.split())
        assert rc == 0, out.stderr
        assert kib < 300 * 1024, (fmt, kib)  # MiB: interpreter + Arrow + a few 8 MiB batches
    assert pq.read_table(tmp_path / "x.parquet").num_rows == 750


def test_large_result_files_are_private(tmp_path: Path) -> None:
    run = pf.Run.create(tmp_path / "r")
    run.map(T.big_bytes, range(3), [200 * 1024] * 3)
    run.execute(workers=2, progress=False)
    files = list((tmp_path / "r" / "results").iterdir())
    assert len(files) == 3
    assert {f.stat().st_mode & 0o777 for f in files} == {0o600}
    assert (tmp_path / "r" / "results").stat().st_mode & 0o777 == 0o700
    assert run.result(3) == T.big_bytes(2, 200 * 1024)  # ids start at 1
    run.close()


def test_export_with_a_lost_result_file_exports_the_rest_and_marks_that_row(tmp_path: Path) -> None:
    run = pf.Run.create(tmp_path / "r")
    run.map(T.big_bytes, range(3), [200 * 1024] * 3)
    run.map(abs, [-7])
    run.execute(workers=2, progress=False)
    run.close()
    (victim,) = [f for f in (tmp_path / "r" / "results").iterdir() if f.name.startswith("2-")]
    victim.unlink()
    p = pf_cli("results", "r", "--format", "json", cwd=tmp_path)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1 and "1 succeeded task(s) have lost their result" in p.stderr
    rows = {r["task_id"]: r for r in json.loads(p.stdout)}
    assert rows[2]["result"] is None and "result file" in rows[2]["error"] and "missing" in rows[2]["error"]
    assert rows[1]["result"] is not None and rows[3]["result"] is not None
    assert rows[4]["result"] == 7 and rows[4]["error"] is None


# === 5. failures and status =========================================================================
def test_failures_json_lists_every_task_of_a_group(tmp_path: Path) -> None:
    ok("submit", "r", "--array", "0-27", "--", "sh", "-c", "echo 'cannot open /data/{index}' >&2; exit 3",
       cwd=tmp_path)
    assert pf_cli("run", "r", "--no-progress", "-w", "2", cwd=tmp_path).returncode == 1
    (group,) = json.loads(ok("failures", "r", "--json", cwd=tmp_path))
    assert group["count"] == 28 and sorted(group["task_ids"]) == list(range(1, 29))


@pytest.mark.slow
def test_status_eta_only_while_the_run_is_worked_on(tmp_path: Path) -> None:
    ok("submit", "r", "--array", "0-11", "--", "sleep", "1", cwd=tmp_path)
    proc = background_run("r", tmp_path, "-w", "2")
    try:
        wait_for(lambda: counts_of(tmp_path / "r")["succeeded"] >= 2)
        live = json.loads(ok("status", "r", "--json", cwd=tmp_path))
        assert live["live"] is True
        assert live["eta_s"] is not None and 2 <= live["eta_s"] <= 12, live
        assert "eta " in ok("status", "r", cwd=tmp_path)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert proc.returncode == 130
    stopped = json.loads(ok("status", "r", "--json", cwd=tmp_path))
    assert stopped["live"] is False and stopped["eta_s"] is None
    assert stopped["done"] < stopped["total"]
    text = ok("status", "r", cwd=tmp_path)
    assert "eta" not in text and "not running" in text and "pipefarm run r" in text


@pytest.mark.slow
def test_status_exit_status_is_documented_and_0_with_failed_tasks(tmp_path: Path) -> None:
    ok("submit", "r", "--array", "0-1", "--", "false", cwd=tmp_path)
    pf_cli("run", "r", "--no-progress", cwd=tmp_path)
    assert pf_cli("status", "r", cwd=tmp_path).returncode == 0
    assert "Exit status: 0 whenever" in ok("status", "--help", cwd=tmp_path)
    one_line_usage_error(pf_cli("status", "nowhere", cwd=tmp_path))


# === 5. progress during pipefarm run ===================================================================
class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty", [False, True], ids=["lines", "bar"])
@pytest.mark.slow
def test_progress_totals_never_go_back_and_rate_counts_from_the_start(tty: bool) -> None:
    """Four 2-second tasks on two workers: two end together at 2 s. The rate is ~1/s and
    the ETA ~2 s, never a burst ("3.4 tasks/s, eta 1 s"); a count read mid-commit that
    misses tasks does not shrink the total."""
    from pipefarm.progress import ProgressDisplay

    stream = _Tty() if tty else io.StringIO()
    d = ProgressDisplay(stream=stream, interval_s=0, fps=1000)
    d({})  # the coordinator has not read the counts yet
    d({"ready": 4, "running": 0})
    time.sleep(2.0)
    d({"ready": 2, "succeeded": 1, "running": 2})
    time.sleep(0.1)
    d({"ready": 2, "succeeded": 2, "running": 2})
    d({"succeeded": 2, "running": 2})  # a stale count that lost the ready ones
    d.close()
    text = stream.getvalue()
    assert "/s, eta 2 s" in text or "eta 2 s" in text, text
    assert "eta 1 s" not in text and "eta 0 s" not in text, text
    assert "2/2 " not in text and "2/2\x1b" not in text, text  # the total stayed 4
    assert d.total == 4 and d.done == 2
    if not tty:
        rates = [float(x.split(";")[1].split("/s")[0]) for x in text.splitlines()]
        assert max(rates) < 1.2, rates


# === 3. list and show ===================================================================================
@pytest.mark.slow
def test_list_names_each_run_and_its_state(tmp_path: Path) -> None:
    (tmp_path / "runs" / "proj").mkdir(parents=True)
    ok("submit", "runs/done", "--array", "0-2", "--", "true", cwd=tmp_path)
    ok("run", "runs/done", "--no-progress", cwd=tmp_path)
    ok("submit", "runs/proj/bad", "--array", "0-2", "--", "sh", "-c", "exit {index}", cwd=tmp_path)
    pf_cli("run", "runs/proj/bad", "--no-progress", cwd=tmp_path)
    ok("submit", "runs/proj/new", "--array", "0-2", "--", "true", cwd=tmp_path)
    ok("submit", "runs/stop", "--array", "0-5", "--", "sleep", "0.5", cwd=tmp_path)
    proc = background_run("runs/stop", tmp_path, "-w", "1")
    wait_for(lambda: counts_of(tmp_path / "runs" / "stop")["succeeded"] >= 1)
    listed = {r["run"]: r for r in json.loads(ok("list", "runs", "--json", cwd=tmp_path))}
    assert listed["runs/stop"]["state"] == "running"
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    before = {p: snapshot(tmp_path / p) for p in listed}

    listed = {r["run"]: r for r in json.loads(ok("list", "runs", "--json", cwd=tmp_path))}
    assert {k: v["state"] for k, v in listed.items()} == {
        "runs/done": "finished", "runs/proj/bad": "failed", "runs/proj/new": "pending",
        "runs/stop": "interrupted-resumable"}
    assert listed["runs/proj/bad"]["counts"]["failed"] == 2
    assert listed["runs/done"]["total"] == 3
    text = ok("list", "runs", cwd=tmp_path)
    assert "interrupted-resumable" in text and "runs/proj/new" in text
    assert {p: snapshot(tmp_path / p) for p in listed} == before  # read only
    one_line_usage_error(pf_cli("list", "nowhere", cwd=tmp_path))
    os.chmod(tmp_path / "runs" / "done", 0o770)  # others can write it: listed, and said so
    listed = {r["run"]: r for r in json.loads(ok("list", "runs", "--json", cwd=tmp_path))}
    assert listed["runs/done"]["state"] == "finished" and "chmod go-w" in listed["runs/done"]["unsafe"]
    assert "unsafe" not in listed["runs/stop"]


@pytest.mark.slow
def test_show_a_command_task_with_every_attempt(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("name,size\nfirst,3\nsecond,4\n")
    # fails once (exit 5), then is killed by a signal on the second attempt
    ok("submit", "r", "--from-csv", "p.csv", "--retries", "1", "--shell", "--",
       'echo out-{name}; echo err-{name} >&2; if [ -e {name}.seen ]; then kill -9 $$; fi;'
       ' touch {name}.seen; exit 5', cwd=tmp_path)
    pf_cli("run", "r", "--no-progress", "-w", "1", cwd=tmp_path)
    before = snapshot(tmp_path / "r")
    info = json.loads(ok("show", "r", "2", "--json", cwd=tmp_path))
    assert info["kind"] == "command" and info["state"] == "failed"
    assert info["source_row"] == {"name": "second", "size": "4"}
    assert info["command"].startswith("echo out-second;")
    a1, a2 = info["attempts"]
    assert (a1["attempt"], a1["outcome"], a1["exit_code"], a1["signal"]) == (1, "failed", 5, None)
    assert (a2["attempt"], a2["exit_code"], a2["signal"]) == (2, -9, "SIGKILL")
    assert a1["worker"] and a1["started_at"].endswith("+00:00")
    for a in (a1, a2):
        where = a["output"]["stdout"]
        data = (tmp_path / where["file"]).read_bytes()
        assert b"".join(data[o:o + n] for o, n in where["extents"]) == b"out-second\n"
    text = ok("show", "r", "2", cwd=tmp_path)
    assert "source row: name=second, size=4" in text and "SIGKILL" in text
    assert "pipefarm logs r 2" in text
    assert snapshot(tmp_path / "r") == before  # read only
    one_line_usage_error(pf_cli("show", "r", "99", cwd=tmp_path))


def test_show_a_python_task(tmp_path: Path) -> None:
    run = pf.Run.create(tmp_path / "r")
    tid = run.submit(T.add, "a" * 5000, b="b")
    run.execute(backend="sequential", progress=False)
    run.close()
    info = json.loads(ok("show", "r", str(tid), "--json", cwd=tmp_path))
    assert info["kind"] == "python" and info["function"] == "add"
    (arg,) = info["args"]
    assert arg.startswith("'aaa") and len(arg) <= 200
    assert info["kwargs"] == {"b": "'b'"}
    (a,) = info["attempts"]  # "a" * 5000 + "b" + 0: a TypeError
    assert a["outcome"] == "failed" and a["error"].startswith("TypeError"), a


@pytest.mark.slow
def test_status_of_an_array_run_follows_its_workers_heartbeats(tmp_path: Path) -> None:
    """A shared-filesystem run: live while a worker's heartbeat is fresh, no ETA once it is
    older than the lease (the worker was killed)."""
    ok("submit", "r", "--array", "0-9", "--", "sleep", "1", cwd=tmp_path)
    ok("array", "r", "--scheduler", "slurm", "--elements", "1", "--time", "10", "--lease", "2",
       cwd=tmp_path)  # writes the script and offers the tasks; submits nothing
    worker = subprocess.Popen([*PF, "worker", "r"], cwd=tmp_path, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def two_done() -> bool:
            return json.loads(ok("status", "r", "--json", cwd=tmp_path))["done"] >= 2

        wait_for(two_done, timeout=60)
        live = json.loads(ok("status", "r", "--json", cwd=tmp_path))
        assert live["live"] is True and live["eta_s"] is not None, live
        assert [r["state"] for r in json.loads(ok("list", ".", "--json", cwd=tmp_path))] == ["running"]
    finally:
        worker.kill()
        worker.wait(timeout=30)
    time.sleep(3)  # past the 2 s lease: the heartbeat is stale
    stopped = json.loads(ok("status", "r", "--json", cwd=tmp_path))
    assert stopped["live"] is False and stopped["eta_s"] is None, stopped
    assert stopped["done"] < stopped["total"]
    assert [r["state"] for r in json.loads(ok("list", ".", "--json", cwd=tmp_path))] == [
        "interrupted-resumable"]

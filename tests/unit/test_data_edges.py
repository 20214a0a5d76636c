"""Edges of the data that goes in and comes out: timeouts at submission, result values and their
exports, retrying succeeded tasks, keys that make submission idempotent, and CSV inputs.

Every test uses real run directories; where the command line is involved it runs real
``pipefarm`` processes (``python -m pipefarm``) and reads back what they wrote.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import math
import os
import pickle
import resource
import signal
import sqlite3
import subprocess
import sys
import warnings
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tasks_lib as T
from cli_lib import ok, one_line_usage_error, pf_cli

import pipefarm as pf
from pipefarm.sources import csv_source


def tasks_in(run_dir: Path) -> int:
    """Tasks in a run's catalog (0 when there is no catalog), read without pipefarm."""
    db = run_dir / "catalog.db"
    if not db.exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("SELECT count(*) FROM tasks").fetchone()[0]
    finally:
        con.close()


def executed(path: Path, fn, values, **kw) -> pf.Run:
    """A run of ``fn`` over ``values``, executed in this process (the reference backend)."""
    run = pf.Run.create(path)
    run.map(fn, values, **kw)
    run.execute(backend="sequential", progress=False)
    return run


# === 8. timeouts are checked at submission =========================================================
BAD_TIMEOUTS = ["nan", "NaN", "-nan", "0", "-0", "-1", "-inf"]


@pytest.mark.parametrize("value", BAD_TIMEOUTS)
@pytest.mark.slow
def test_cli_refuses_nan_and_nonpositive_timeouts(tmp_path: Path, value: str) -> None:
    p = pf_cli("submit", "r", "--array", "0-2", f"--timeout={value}", "--", "true", cwd=tmp_path)
    msg = one_line_usage_error(p)
    assert "--timeout" in msg, msg
    assert not (tmp_path / "r").exists()  # nothing written, not even an empty run


@pytest.mark.parametrize("value", [math.nan, 0, 0.0, -0.0, -1, -math.inf])
def test_api_refuses_nan_and_nonpositive_timeouts(tmp_path: Path, value: float) -> None:
    run = pf.Run.create(tmp_path / "r")
    for submit in (
        lambda: run.map(T.square, range(3), timeout=value),
        lambda: run.submit_task(T.square, (1,), timeout=value),
        lambda: run.submit_cmd(["true"], timeout=value),
    ):
        with pytest.raises(ValueError, match="timeout"):
            submit()
    assert len(run) == 0
    assert run.store.db.execute("SELECT count(*) FROM specs").fetchone()[0] == 0


@pytest.mark.slow
def test_any_positive_timeout_is_accepted_and_inf_means_none(tmp_path: Path) -> None:
    # accepted and kept as given (how a huge one runs is the backends' business, not tested here)
    kept = pf.Run.create(tmp_path / "kept")
    big = kept.submit_task(T.square, (4,), timeout=1e300)
    tiny = kept.submit_task(T.square, (5,), timeout=1e-300)
    (one,) = kept.map(T.square, [5], timeout=1)
    specs = {t.id: kept.store.spec(t.spec) for t in kept.tasks()}
    assert (specs[big].timeout, specs[tiny].timeout, specs[one].timeout) == (1e300, 1e-300, 1.0)

    run = pf.Run.create(tmp_path / "api")
    ids = run.map(T.square, [3], timeout=math.inf)
    assert run.store.spec(run.tasks()[0].spec).timeout is None  # inf: no timeout
    run.execute(backend="sequential", progress=False)
    assert run.result(ids[0]) == 9

    for value in ("inf", "Infinity", "1e300", "0.001"):
        out = ok("submit", f"c{value}", "--timeout", value, "--", "true", cwd=tmp_path)
        assert out.startswith("added task 1 (1)"), out
    ok("run", "cinf", "--no-progress", "-w", "1", cwd=tmp_path)  # inf: runs, and is not killed
    (row,) = [json.loads(x) for x in ok("results", "cinf", "--format", "jsonl", cwd=tmp_path).splitlines()]
    assert row["state"] == "succeeded"
    with pf.Run.open(tmp_path / "cinf") as r:
        assert r.store.spec(r.tasks()[0].spec).timeout is None


# === 11. a failed export never wipes the file it replaces ==========================================
def _ignore_sigxfsz_and_cap_files(limit: int):
    def pre() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the cap fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
@pytest.mark.slow
def test_failed_export_keeps_the_existing_file(tmp_path: Path, fmt: str) -> None:
    # incompressible values, so that every format is far past the cap below
    executed(tmp_path / "r", T.ident, [hashlib.sha256(b"%d" % i).hexdigest() * 5
                                       for i in range(2000)]).close()
    keep = tmp_path / f"keep.{fmt}"
    keep.write_bytes(b"precious earlier export\n")
    # files may not grow past 64 KiB in the exporting process: the export (~700 KB) fails midway
    p = pf_cli("results", "r", "-o", keep.name, cwd=tmp_path,
               preexec=_ignore_sigxfsz_and_cap_files(64 * 1024))
    msg = one_line_usage_error(p)
    assert keep.name in msg, msg
    assert keep.read_bytes() == b"precious earlier export\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(["r", keep.name])  # no temp left


def test_dict_results_export_over_an_existing_file(tmp_path: Path) -> None:
    """The issue's own case: dict results, ``-o keep.csv`` that already exists."""
    values = [{"alpha": i, "tag": f"t{i}"} for i in range(3)]
    executed(tmp_path / "r", T.ident, values).close()
    keep = tmp_path / "keep.csv"
    keep.write_text("old\n")
    os.chmod(keep, 0o640)
    ok("results", "r", "-o", "keep.csv", cwd=tmp_path)
    rows = list(csv.DictReader(io.StringIO(keep.read_text())))
    assert [json.loads(r["result"]) for r in rows] == values
    assert keep.stat().st_mode & 0o777 == 0o640  # the replaced file keeps its permissions


@pytest.mark.parametrize("values", [
    pytest.param([{"a": 1, "b": [1.5, 2.5]}, {"a": 2, "b": []}], id="same-keys-struct"),
    pytest.param([[1, 2], [3], []], id="lists"),
    pytest.param([{"a": 1}, {"b": "x"}], id="different-keys"),
    pytest.param([[1, "a"], {"k": [None, True]}], id="mixed-nested"),
])
@pytest.mark.slow
def test_dict_and_list_results_export_in_every_format(tmp_path: Path, values: list) -> None:
    run = executed(tmp_path / "r", T.ident, values)
    table = run.results()
    nested = pa.types.is_struct(table.schema.field("result").type) or pa.types.is_list(
        table.schema.field("result").type)
    run.close()
    ok("results", "r", "-o", "out.parquet", cwd=tmp_path)
    ok("results", "r", "-o", "out.csv", cwd=tmp_path)
    ok("results", "r", "-o", "out.json", cwd=tmp_path)

    got_pq = pq.read_table(tmp_path / "out.parquet").column("result").to_pylist()
    if nested:  # Arrow can hold them: a struct or list column, the values themselves
        assert got_pq == values
    else:  # it cannot: JSON text
        assert [json.loads(v) for v in got_pq] == values
    got_csv = [json.loads(r["result"]) for r in csv.DictReader(open(tmp_path / "out.csv"))]
    assert got_csv == values
    got_json = [r["result"] for r in json.loads((tmp_path / "out.json").read_text())]  # an array
    assert got_json == values


# === 12. results keep their values, never their repr ================================================
def test_mixed_results_come_back_as_the_objects(tmp_path: Path) -> None:
    values = ["a", (1, "a"), 2**70, 1.5, None, {"k": (1, 2)}, Decimal("1.10"), b"\x00\xff"]
    run = executed(tmp_path / "r", T.ident, values)
    table = run.results()
    field = table.schema.field("result")
    assert field.type == pa.binary()
    assert field.metadata == {b"pipefarm.encoding": b"pickle"}
    col = table.column("result").to_pylist()
    decoded = [None if b is None else pickle.loads(b) for b in col]
    assert decoded == values
    assert [type(v) for v in decoded] == [type(v) for v in values]
    rows = run.results(as_objects=True)
    assert [r["result"] for r in rows] == values
    assert [type(r["result"]) for r in rows] == [type(v) for v in values]
    assert [r["task_id"] for r in rows] == table.column("task_id").to_pylist()
    assert all(r["state"] == "succeeded" for r in rows)


@pytest.mark.parametrize("values,arrow_type", [
    pytest.param([1, 2, 3], pa.int64(), id="ints"),
    pytest.param(["a", "b", None], pa.string(), id="strings"),
    pytest.param([1, 2.5], pa.float64(), id="ints-widen-to-float"),
    pytest.param([True, False], pa.bool_(), id="bools"),
    pytest.param([{"x": 1}, {"x": 2}], pa.struct([("x", pa.int64())]), id="struct"),
    pytest.param([[1.0], [2.0, 3.0]], pa.list_(pa.float64()), id="list"),
    pytest.param([dt.date(2024, 1, 2)], pa.date32(), id="dates"),
])
def test_uniform_results_get_a_typed_column(tmp_path: Path, values: list, arrow_type) -> None:
    run = executed(tmp_path / "r", T.ident, values)
    table = run.results()
    assert table.schema.field("result").type == arrow_type
    assert table.schema.field("result").metadata is None
    assert table.column("result").to_pylist() == values
    assert [r["result"] for r in run.results(as_objects=True)] == values


@pytest.mark.parametrize("values", [
    pytest.param([(1, 2), (3, 4)], id="tuples-are-not-lists"),
    pytest.param([True, 1], id="bool-and-int"),
    pytest.param([2**53 + 1, 0.5], id="int-that-a-float-cannot-hold"),
    pytest.param([{"a": 1}, {"b": 2}], id="dicts-with-different-keys"),
    pytest.param([2**70], id="beyond-int64"),
])
def test_values_arrow_would_change_are_pickled(tmp_path: Path, values: list) -> None:
    run = executed(tmp_path / "r", T.ident, values)
    table = run.results()
    assert table.schema.field("result").metadata == {b"pipefarm.encoding": b"pickle"}
    decoded = [pickle.loads(b) for b in table.column("result").to_pylist()]
    assert decoded == values and [type(v) for v in decoded] == [type(v) for v in values]


@pytest.mark.slow
def test_cli_exports_mixed_results_as_json_text_or_a_marker(tmp_path: Path) -> None:
    values = ["a", (1, "a"), 2**70, None, Decimal("1.10"), {3: "int key"}]
    executed(tmp_path / "r", T.ident, values).close()
    expect_json = ["a", [1, "a"], 2**70, None]
    markers = ["<not JSON-encodable: decimal.Decimal>", "<not JSON-encodable: dict>"]

    rows = [json.loads(x) for x in ok("results", "r", "--format", "jsonl", cwd=tmp_path).splitlines()]
    assert [r["result"] for r in rows] == expect_json + markers

    rows_csv = list(csv.DictReader(io.StringIO(ok("results", "r", "--format", "csv", cwd=tmp_path))))
    cells = [r["result"] for r in rows_csv]
    assert [json.loads(c) for c in cells[:3]] == expect_json[:3]
    assert cells[3] == "" and cells[4:] == markers
    assert not any(c.startswith("'") or c.startswith("(") for c in cells)  # never a repr

    ok("results", "r", "-o", "r.parquet", cwd=tmp_path)
    t = pq.read_table(tmp_path / "r.parquet")
    assert t.schema.field("result").type == pa.string()
    assert t.schema.field("result").metadata == {b"pipefarm.encoding": b"json"}
    got = t.column("result").to_pylist()
    assert [json.loads(c) for c in got[:3]] == expect_json[:3]
    assert got[3] is None and got[4:] == markers


# === 13. retrying succeeded tasks takes --force ======================================================
@pytest.mark.slow
def test_cli_retry_ids_refuses_succeeded_tasks_without_force(tmp_path: Path) -> None:
    ok("submit", "r", "--array", "0-3", "--", "sh", "-c", "echo out{index}; exit $(( {index} == 3 ))",
       cwd=tmp_path)
    p = pf_cli("run", "r", "--no-progress", "-w", "1", cwd=tmp_path)
    assert p.returncode == 1, p.stderr
    before = ok("results", "r", "--format", "json", cwd=tmp_path)

    msg = one_line_usage_error(pf_cli("retry", "r", "--ids", "1-2,4", cwd=tmp_path))
    assert "2 " in msg and "succeeded" in msg and "--force" in msg, msg
    assert ok("results", "r", "--format", "json", cwd=tmp_path) == before  # nothing changed

    # the failed one alone needs no force
    assert ok("retry", "r", "--ids", "4", cwd=tmp_path).startswith("1 task(s)")
    # --force goes with --ids only
    one_line_usage_error(pf_cli("retry", "r", "--force", cwd=tmp_path))

    out = ok("retry", "r", "--ids", "1", "--force", cwd=tmp_path)
    assert out.startswith("1 task(s)"), out
    p = pf_cli("run", "r", "--no-progress", "-w", "1", cwd=tmp_path)
    assert p.returncode == 1, p.stderr  # task 4 fails again
    rows = {r["task_id"]: r for r in map(json.loads, ok("results", "r", "--format", "jsonl",
                                                        cwd=tmp_path).splitlines())}
    assert rows[1]["state"] == "succeeded" and rows[1]["attempts"] == 2
    assert rows[2]["attempts"] == 1  # untouched
    # the earlier success is still in the history, output included
    assert ok("logs", "r", "1", "--attempt", "1", cwd=tmp_path) == "out0\n"
    assert ok("logs", "r", "1", "--attempt", "2", cwd=tmp_path) == "out0\n"
    with pf.Run.open(tmp_path / "r") as run:
        assert [a.outcome for a in run.attempts(1)] == ["succeeded", "succeeded"]


def test_api_retry_force(tmp_path: Path) -> None:
    run = executed(tmp_path / "r", T.square, [2, 3])
    with pytest.raises(ValueError, match=r"1 .*succeeded.*force=True"):
        run.retry([1])
    assert run.status()["succeeded"] == 2 and run.result(1) == 4
    assert run.retry([1], force=True) == 1
    assert run.status()["ready"] == 1
    run.execute(backend="sequential", progress=False)
    assert run.result(1) == 4
    assert [a.outcome for a in run.attempts(1)] == ["succeeded", "succeeded"]
    assert [a.attempt for a in run.attempts(1)] == [1, 2]


# === 14. keys make submission idempotent =============================================================
DRIVER = """\
import sys
import pipefarm as pf
import tasks_lib as T

run = pf.Run.create(sys.argv[1], exist_ok=True)
ids = run.map(T.square, range(6), keys=[f"sq{i}" for i in range(6)])
more = run.submit_task(T.add, (1, 2), key="three")
print(list(ids), more, flush=True)
if sys.argv[2] == "crash":
    import os
    os._exit(3)  # the driver dies before executing anything
run.execute(workers=1, progress=False)
print(sorted(run.result(i) for i in ids), run.result(more))
"""


def test_rerunning_a_driver_script_does_not_duplicate_the_run(tmp_path: Path) -> None:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(T.__file__).parent) + os.pathsep + env.get("PYTHONPATH", "")
    first = subprocess.run([sys.executable, str(script), "runs/x", "crash"], cwd=tmp_path,
                           capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 3, first.stderr
    again = subprocess.run([sys.executable, str(script), "runs/x", "finish"], cwd=tmp_path,
                           capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0, again.stderr
    assert first.stdout.splitlines()[0] == again.stdout.splitlines()[0] == "[1, 2, 3, 4, 5, 6] 7"
    assert again.stdout.splitlines()[1] == "[0, 1, 4, 9, 16, 25] 3"
    assert tasks_in(tmp_path / "runs/x") == 7


def test_existing_keys_return_existing_ids_and_new_ones_are_dense(tmp_path: Path) -> None:
    run = pf.Run.create(tmp_path / "r")
    assert list(run.map(T.square, [1, 2], keys=["a", "b"])) == [1, 2]
    run.submit(T.square, 9)  # unkeyed: 3
    ids = run.map(T.square, [10, 20, 30, 40], keys=["c", "a", "d", "b"])
    assert list(ids) == [4, 1, 5, 2]
    assert ids.existing == 2
    assert run.submit_task(T.square, (7,), key="d") == 5
    assert len(run) == 5
    assert [t.id for t in run.tasks()] == [1, 2, 3, 4, 5]
    # unkeyed submissions are not deduplicated (nothing identifies them)
    assert list(run.map(T.square, [1, 2])) == [6, 7]
    # a submission whose tasks all exist writes nothing new
    assert list(run.map(T.square, [1, 2], keys=["a", "b"])) == [1, 2]
    assert len(run) == 7


def test_number_keys_are_their_text(tmp_path: Path) -> None:
    run = pf.Run.create(tmp_path / "r")
    assert list(run.map(T.square, [1, 2], keys=[1, 2])) == [1, 2]
    assert list(run.map(T.square, [1, 2, 3], keys=[2, "1", 3])) == [2, 1, 3]
    assert [t.key for t in run.tasks()] == ["1", "2", "3"]


def test_existing_keys_do_not_get_new_dependencies(tmp_path: Path) -> None:
    run = pf.Run.create(tmp_path / "r")
    (a,) = run.map(T.square, [1], keys=["a"])
    (b,) = run.map(T.square, [2], keys=["b"])
    ids = run.map(T.square, [3, 4], keys=["a", "c"], after=[b])
    assert list(ids) == [a, 3]
    deps = run.store.db.execute("SELECT dep, task FROM deps ORDER BY task").fetchall()
    assert deps == [(b, 3)]
    assert run.status() == {**run.status(), "ready": 2, "blocked": 1}


@pytest.mark.parametrize("keys", [["x", "y", "x"], ["dup", "dup"]])
def test_a_key_repeated_within_one_submission_is_refused(tmp_path: Path, keys: list[str]) -> None:
    run = pf.Run.create(tmp_path / "r")
    with pytest.raises(ValueError, match=f"key {keys[-1]!r}.*more than once"):
        run.map(T.square, range(len(keys)), keys=keys)
    assert len(run) == 0
    # also when the first occurrence is already in the run
    run.map(T.square, [0], keys=[keys[-1]])
    with pytest.raises(ValueError, match="more than once"):
        run.map(T.square, range(len(keys)), keys=keys)
    assert len(run) == 1


@pytest.mark.slow
def test_cli_submit_with_the_same_key_twice(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("a\n1\n2\n")
    first = ok("submit", "r", "--from-csv", "p.csv", "--key", "a{a}", "--", "echo", "{a}",
               cwd=tmp_path)
    assert first == "added tasks 1-2 (2) to r\n"
    again = ok("submit", "r", "--from-csv", "p.csv", "--key", "a{a}", "--", "echo", "{a}",
               cwd=tmp_path)
    assert "no new tasks" in again and "2" in again, again
    (tmp_path / "p.csv").write_text("a\n1\n2\n3\n")
    more = ok("submit", "r", "--from-csv", "p.csv", "--key", "a{a}", "--", "echo", "{a}",
              cwd=tmp_path)
    assert more.startswith("added task 3 (1) to r"), more
    assert "2 already" in more, more
    assert tasks_in(tmp_path / "r") == 3

    (tmp_path / "q.csv").write_text("a,b\n1,x\n1,y\n")
    msg = one_line_usage_error(pf_cli("submit", "r", "--from-csv", "q.csv", "--key", "a{a}",
                                      "--", "echo", "{b}", cwd=tmp_path))
    assert "'a1'" in msg and "more than once" in msg, msg
    assert tasks_in(tmp_path / "r") == 3


def _old_catalog(path: Path, keys: list[str | None]) -> None:
    """A catalog as older pipefarm wrote it: no index on key (duplicates possible)."""
    run = pf.Run.create(path)
    run.map(T.square, range(len(keys)))
    run.close()
    con = sqlite3.connect(path / "catalog.db")
    for name in [n for (n,) in con.execute(
            "SELECT name FROM sqlite_master WHERE type='index' AND sql LIKE '%key%'")]:
        con.execute(f"DROP INDEX {name}")
    con.executemany("UPDATE tasks SET key=? WHERE id=?", [(k, i) for i, k in enumerate(keys, 1)])
    con.commit()
    con.close()


def test_old_catalog_gets_the_unique_index(tmp_path: Path) -> None:
    _old_catalog(tmp_path / "r", ["a", "b", None])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = pf.Run.open(tmp_path / "r")
    assert run.map(T.square, [5, 6], keys=["b", "c"]) == [2, 4]
    run.close()
    con = sqlite3.connect(tmp_path / "r" / "catalog.db")
    with pytest.raises(sqlite3.IntegrityError):
        con.execute("INSERT INTO tasks(id, spec, state, key) VALUES (99, 1, 1, 'a')")
    con.close()


def test_old_catalog_with_duplicate_keys_keeps_working_and_says_so_once(tmp_path: Path) -> None:
    _old_catalog(tmp_path / "r", ["a", "a", "b"])
    with pytest.warns(UserWarning, match="more than once") as got:
        run = pf.Run.open(tmp_path / "r")
    assert len(got) == 1
    assert list(run.map(T.square, [1, 2], keys=["a", "z"])) == [1, 4]  # the first "a"
    run.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: not again at the next open
        run = pf.Run.open(tmp_path / "r")
    assert run.submit_task(T.square, (1,), key="z") == 4
    run.execute(backend="sequential", progress=False)
    assert run.status()["succeeded"] == 4
    run.close()
    p = pf_cli("status", "r", cwd=tmp_path)
    assert p.returncode == 0 and "warning" not in p.stderr.lower(), p.stderr


# === 15. CSV rows that are short, and a byte-order mark ================================================
def test_csv_short_row_is_refused_with_its_line(tmp_path: Path) -> None:
    f = tmp_path / "p.csv"
    f.write_text("sample,reads,note\ns1,100,x\n\ns2,200\ns3,300,z\n")
    rows = csv_source(f)
    assert next(rows) == {"sample": "s1", "reads": "100", "note": "x"}
    with pytest.raises(ValueError, match=r"line 4: 2 cells but the header has 3"):
        next(rows)


def test_cli_refuses_a_short_csv_row_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("a,b\n1,2\n3\n")
    for extra in ([], ["--key", "k{a}"]):
        msg = one_line_usage_error(pf_cli("submit", "r", "--from-csv", "p.csv", *extra, "--",
                                          "echo", "{a}", "{b}", cwd=tmp_path))
        assert "line 3: 1 cell but the header has 2" in msg, msg
        assert tasks_in(tmp_path / "r") == 0


def test_csv_byte_order_mark_is_not_part_of_the_header(tmp_path: Path) -> None:
    f = tmp_path / "excel.csv"
    f.write_bytes("\ufeffalpha,beta\r\n0.1,x\r\n".encode())
    assert list(csv_source(f)) == [{"alpha": "0.1", "beta": "x"}]
    ok("submit", "r", "--from-csv", "excel.csv", "--", "echo", "{alpha}", "{beta}", cwd=tmp_path)
    ok("run", "r", "--no-progress", "-w", "1", cwd=tmp_path)
    assert ok("logs", "r", "1", cwd=tmp_path) == "0.1 x\n"

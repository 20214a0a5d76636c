"""The habits users bring: a damaged catalog, retry ids, shared directories (issue 8).

Real ``pipefarm`` processes on real run directories; the damage is real bytes on disk.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import pipefarm as pf
import pipefarm.errors


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipefarm", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def one_error(p: subprocess.CompletedProcess) -> str:
    """The single error line of a refused command (exit 2, no traceback)."""
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipefarm: error: "), p.stderr
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A real finished command run of 3,000 tasks, checkpointed into one catalog file."""
    base = tmp_path_factory.mktemp("finished")
    run = base / "run"
    assert cli("submit", str(run), "--array", "0-2999", "--", "echo", "{index}").returncode == 0
    assert cli("run", str(run), "--backend", "sequential", "--no-progress").returncode == 0
    db = sqlite3.connect(run / "catalog.db")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return run


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(mode=0o700)
    for f in src.rglob("*"):
        target = dst / f.relative_to(src)
        if f.is_dir():
            target.mkdir(mode=0o700, exist_ok=True)
        elif not f.name.startswith("catalog.db-"):
            target.write_bytes(f.read_bytes())
    return dst


def _damage(kind: str, run: Path) -> None:
    db = run / "catalog.db"
    data = db.read_bytes()
    if kind == "garbage":
        db.write_bytes(os.urandom(64 * 1024))
    elif kind == "truncated":
        db.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        db.write_bytes(b"")
    elif kind == "bad-pages":  # header and schema intact: the damage shows in a later query
        with open(db, "r+b") as f:
            f.seek(4096 * 60)
            f.write(b"\xff" * 4096 * 20)


VERBS = [
    ["status", "{run}"],
    ["status", "{run}", "--json"],
    ["results", "{run}", "--format", "csv"],
    ["failures", "{run}"],
    ["run", "{run}", "--no-progress"],
    ["submit", "{run}", "--", "true"],
    ["retry", "{run}"],
    ["retry", "{run}", "--ids", "1"],
    ["cancel", "{run}"],
    ["logs", "{run}", "5"],
    ["show", "{run}", "5"],
    ["array", "{run}", "--scheduler", "slurm", "--dry-run"],
]


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty", "bad-pages"])
@pytest.mark.slow
def test_damaged_catalog_is_one_error_and_a_hint_for_every_verb(finished, tmp_path, kind):
    run = _copy(finished, tmp_path / "run")
    _damage(kind, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for verb in VERBS:
        if kind == "bad-pages" and (verb[0] in ("logs", "show", "submit", "array")
                                    or "--ids" in verb):
            # they touch a few rows, not the damaged ones; SQLite finds damage where it reads
            # (a full check on every open would cost seconds on a big catalog)
            continue
        args = [a.format(run=run) for a in verb]
        p = cli(*args)
        assert p.returncode == 2, (args, p.stderr)
        assert "Traceback" not in p.stderr, (args, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 2, (args, p.stderr)
        assert lines[0].startswith("pipefarm: error: the catalog ")
        assert f"{run / 'catalog.db'} is damaged" in lines[0]
        assert lines[1].startswith("pipefarm: hint: ") and "sqlite3 damaged/catalog.db" in lines[1]
        # nothing changed, nothing left behind (no -wal/-shm beside a damaged file)
        after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        assert after.keys() - before.keys() <= {"catalog.db-wal", "catalog.db-shm"}
        assert after["catalog.db"] == before["catalog.db"], args
        assert not (run / "catalog.db-wal").exists() or not (run / "catalog.db-wal").stat().st_size


@pytest.mark.parametrize("kind", ["garbage", "empty", "bad-pages"])
@pytest.mark.slow
def test_list_with_a_damaged_run_says_so_without_a_traceback(finished, tmp_path, kind):
    run = _copy(finished, tmp_path / "run")
    _damage(kind, run)
    before = (run / "catalog.db").read_bytes()
    p = cli("list", str(tmp_path))
    assert "Traceback" not in p.stderr, p.stderr
    assert "damaged" in p.stdout + p.stderr, (p.stdout, p.stderr)
    assert (run / "catalog.db").read_bytes() == before


@pytest.mark.slow
def test_damaged_catalog_from_the_python_api(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    _damage("empty", run)
    with pytest.raises(pipefarm.errors.CatalogDamaged, match="is damaged") as info:
        pf.Run.open(run)
    assert info.value.path == str(run / "catalog.db")
    assert (run / "catalog.db").stat().st_size == 0


@pytest.mark.slow
def test_the_hint_recovers_a_truncated_catalog(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    _damage("truncated", run)
    original = (run / "catalog.db").read_bytes()
    p = cli("status", str(run))
    hint = p.stderr.strip().splitlines()[1].split(": ", 2)[2]
    command = hint.split("readable: ", 1)[1]
    subprocess.run(["sh", "-c", command], check=True, capture_output=True)
    assert (run / "damaged" / "catalog.db").read_bytes() == original  # the original is kept
    p = cli("status", str(run), "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["counts"]["succeeded"] > 0  # the readable part came back


def test_empty_catalog_of_a_run_being_created_is_not_damage(tmp_path):
    # another process has just created the file and is about to write its first page
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    (run / "catalog.db").write_bytes(b"")
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, time; time.sleep(0.3);"
        f"db = sqlite3.connect({str(run / 'catalog.db')!r}); db.execute('PRAGMA journal_mode=WAL');"
        "db.execute('CREATE TABLE meta(key TEXT PRIMARY KEY, value)'); db.commit()")])
    try:
        p = cli("status", str(run))
    finally:
        writer.wait(timeout=60)
    assert p.returncode == 0, p.stderr


# --- retry ids and flags ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def failing(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("failing") / "run"
    assert cli("submit", str(run), "--array", "0-9", "--", "sh", "-c", "exit {index}").returncode == 0
    assert cli("run", str(run), "--backend", "sequential", "--no-progress").returncode == 1
    return run


@pytest.mark.parametrize(("args", "says"), [
    (["--ids", "99999"], "no task 99999 in"),
    (["--ids", "3,11-14,99"], "no task 11-14, 99 in"),
    (["--ids", "5-3"], "'5-3' is an empty range"),
    (["--ids", ","], "names no task ids"),
    (["--ids", "x"], "'x' is not an id"),
    (["--failed", "--all"], "--failed and --all contradict"),
    (["--ids", "3", "--all"], "drop --failed/--all"),
    (["--ids", "3", "--failed"], "drop --failed/--all"),
])
@pytest.mark.slow
def test_retry_refuses_unknown_ids_bad_ranges_and_contradictions(failing, args, says):
    before = pf.Run.open(failing).status()
    line = one_error(cli("retry", str(failing), *args))
    assert says in line
    assert pf.Run.open(failing).status() == before  # nothing changed


def test_retry_of_known_ids_still_works(tmp_path, failing):
    run = _copy(failing, tmp_path / "run")
    p = cli("retry", str(run), "--ids", "2-3")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("2 task(s) will run again")


# --- shared directories ---------------------------------------------------------------------
def _warned(p: subprocess.CompletedProcess, run: Path) -> None:
    assert p.returncode == 0, p.stderr
    warn = [x for x in p.stderr.splitlines() if x.startswith("pipefarm: warning: ")]
    assert len(warn) == 1 and str(run) in warn[0] and "chmod go-w" in warn[0], p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_reading_verbs_warn_on_a_group_writable_run(failing, tmp_path):
    run = _copy(failing, tmp_path / "run")
    os.chmod(run, 0o770)
    _warned(p := cli("status", str(run)), run)
    assert "10 tasks" in p.stdout
    _warned(cli("failures", str(run)), run)
    _warned(p := cli("logs", str(run), "1", "--stderr"), run)
    # command tasks have no pickled results: results reads nothing it would unpickle
    _warned(p := cli("results", str(run), "--format", "csv"), run)
    assert len(p.stdout.strip().splitlines()) == 11
    _warned(p := cli("show", str(run), "3"), run)  # a command task: nothing to unpickle
    assert "exit 2" in p.stdout  # its command (task 3 has index 2)
    assert stat.S_IMODE(run.stat().st_mode) == 0o770  # never changed behind the user's back


@pytest.mark.parametrize("verb", [["run", "--no-progress"], ["retry"], ["cancel"],
                                  ["submit", "--", "true"]])
@pytest.mark.slow
def test_writing_verbs_refuse_a_group_writable_run_and_keep_its_mode(failing, tmp_path, verb):
    run = _copy(failing, tmp_path / "run")
    os.chmod(run, 0o770)
    before = (run / "catalog.db").read_bytes()
    line = one_error(cli(verb[0], str(run), *verb[1:]))
    assert "chmod go-w" in line and str(run) in line
    assert stat.S_IMODE(run.stat().st_mode) == 0o770
    assert (run / "catalog.db").read_bytes() == before


def test_results_refuses_to_unpickle_from_a_shared_run(tmp_path):
    run = tmp_path / "run"
    with pf.Run.create(run) as r:
        r.map(abs, [-1, -2])
        r.execute(backend="sequential", progress=False)
    os.chmod(run, 0o777)
    line = one_error(cli("results", str(run), "--format", "json"))
    assert "unpickle" in line and "chmod go-w" in line
    _warned(cli("status", str(run)), run)  # counts unpickle nothing
    line = one_error(cli("show", str(run), "1"))  # it would unpickle the task's arguments
    assert "unpickle" in line and "chmod go-w" in line
    with pytest.raises(pf.UnsafeRun):
        pf.Run.open(run)


def test_submit_into_an_existing_open_directory_refuses_and_changes_nothing(tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    line = one_error(cli("submit", str(d), "--array", "0-3", "--", "echo", "{index}"))
    assert "chmod go-w" in line
    assert stat.S_IMODE(d.stat().st_mode) == 0o777
    assert list(d.iterdir()) == []


@pytest.mark.parametrize(("args", "says"), [
    (["--ids", "99999"], "no task 99999 in"),
    (["--ids", "5-3"], "'5-3' is an empty range"),
])
@pytest.mark.slow
def test_cancel_refuses_unknown_ids_and_bad_ranges(tmp_path, args, says):
    run = tmp_path / "run"
    assert cli("submit", str(run), "--array", "0-4", "--", "true").returncode == 0
    p = cli("cancel", str(run), *args)
    assert p.returncode == 2 and says in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert "cancelled" not in p.stdout
    st = json.loads(cli("status", str(run), "--json").stdout)
    assert {k: v for k, v in st["counts"].items() if v} == {"ready": 5}, st

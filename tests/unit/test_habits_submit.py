"""Issue 8, "the habits users bring": templates, GNU parallel syntax and submission mistakes.

End to end with real ``pipefarm`` processes (``submit``, ``run``, ``logs``) on real commands
(awk, sh, gzip, Python): ordinary shell text in templates, ``{}`` and ``:::``/``::::`` as GNU
parallel users write them, and the one-line refusals of ``submit`` that leave nothing behind.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipefarm.execute.template import Command, placeholders, render
from pipefarm.sources import CATALOG_BYTES_PER_TASK, catalog_estimate, split_inline_args

PF = [sys.executable, "-m", "pipefarm"]


def pf(*args: str | bytes | Path, cwd: Path, env: dict[str, str] | None = None
       ) -> subprocess.CompletedProcess[bytes]:
    """One ``pipefarm`` process; arguments may be bytes (argv that is not UTF-8)."""
    argv = [a if isinstance(a, bytes) else os.fsencode(str(a)) for a in args]
    proc = subprocess.run([os.fsencode(a) for a in PF] + argv, cwd=cwd,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=120)
    proc.stderr = proc.stderr.decode("utf-8", "replace")  # type: ignore[assignment]
    return proc


def ok(*args: str | bytes | Path, cwd: Path, env: dict[str, str] | None = None) -> bytes:
    proc = pf(*args, cwd=cwd, env=env)
    assert proc.returncode == 0, (args, proc.returncode, proc.stderr)
    return proc.stdout


def refused(*args: str | bytes | Path, cwd: Path) -> str:
    """A user mistake: exit 2 and exactly one line ``pipefarm: error: ...``, no traceback."""
    proc = pf(*args, cwd=cwd)
    assert proc.returncode == 2, (args, proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipefarm: error: "), proc.stderr
    return lines[0]


def submit_run(tmp_path: Path, *args: str | bytes, expect: int = 0) -> int:
    """Submit to a fresh run ``r``, run it, return how many tasks were added."""
    out = ok("submit", "r", *args, cwd=tmp_path).decode()
    m = re.fullmatch(r"added tasks? \d+(?:-\d+)? \(([\d,]+)\) to r\n", out)
    assert m, out
    proc = pf("run", "r", "--no-progress", "--workers", "2", cwd=tmp_path)
    assert proc.returncode == expect, proc.stderr
    return int(m.group(1).replace(",", ""))


def logs(tmp_path: Path, n: int, *extra: str) -> list[bytes]:
    return [ok("logs", "r", str(t), *extra, cwd=tmp_path) for t in range(1, n + 1)]


# --- 1. templates that accept ordinary shell ---------------------------------------------------
@pytest.mark.slow
def test_awk_program_braces_are_literal(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha 1\nbeta 2\n")
    (tmp_path / "b.txt").write_text("gamma 3\n")
    (tmp_path / "in.txt").write_text("a.txt\nb.txt\n")
    n = submit_run(tmp_path, "--from-file", "in.txt", "--", "awk", "{print $1}", "{line}")
    assert logs(tmp_path, n) == [b"alpha\nbeta\n", b"gamma\n"]


@pytest.mark.slow
def test_awk_identifier_in_braces_is_a_placeholder_with_a_hint(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha 1\n")
    (tmp_path / "in.txt").write_text("a.txt\n")
    msg = refused("submit", "r", "--from-file", "in.txt", "--", "awk", "{print}", "{line}",
                  cwd=tmp_path)
    assert "{print}" in msg and "{{print}}" in msg
    n = submit_run(tmp_path, "--from-file", "in.txt", "--", "awk", "{{print}}", "{line}")
    assert logs(tmp_path, n) == [b"alpha 1\n"]


@pytest.mark.slow
def test_shell_dollar_brace_is_the_shells_variable(tmp_path: Path) -> None:
    home = str(tmp_path / "home-dir")
    ok("submit", "r", "--shell", "--array", "3-4", "--", "echo ${HOME} {index}", cwd=tmp_path)
    proc = pf("run", "r", "--no-progress", cwd=tmp_path, env={"HOME": home})
    assert proc.returncode == 0, proc.stderr
    assert logs(tmp_path, 2) == [f"{home} 3\n".encode(), f"{home} 4\n".encode()]


@pytest.mark.slow
def test_shell_brace_group_and_exit_status(tmp_path: Path) -> None:
    script = "test -e {line} || { echo boom {line} >&2; exit 7; }"
    (tmp_path / "in.txt").write_text("present\nabsent\n")
    (tmp_path / "present").write_text("")
    n = submit_run(tmp_path, "--from-file", "in.txt", "--", "sh", "-c", script, expect=1)
    assert n == 2
    assert logs(tmp_path, 2, "--stderr") == [b"", b"boom absent\n"]
    rows = json.loads(ok("results", "r", "--format", "json", cwd=tmp_path))
    assert [r["exit_code"] for r in rows] == [0, 7]


@pytest.mark.slow
def test_shell_mode_brace_group_through_sh(tmp_path: Path) -> None:
    n = submit_run(tmp_path, "--shell", "--array", "0-1", "--",
                   "test {index} = 1 || { echo not-one {index}; exit 3; }", expect=1)
    assert logs(tmp_path, n) == [b"not-one 0\n", b""]


@pytest.mark.slow
def test_typos_and_escapes(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("x\n")
    msg = refused("submit", "r", "--from-file", "in.txt", "--", "echo", "{lien}", cwd=tmp_path)
    assert "{lien}" in msg and "{line}" in msg
    assert not (tmp_path / "r").exists()
    n = submit_run(tmp_path, "--from-file", "in.txt", "--", "echo", "{{line}}", "{line:>3}")
    assert logs(tmp_path, n) == [b"{line}   x\n"]


def test_column_name_that_is_no_identifier_is_refused(tmp_path: Path) -> None:
    # {sample-id} is literal text now: naming a column, it would pass silently as a typo
    (tmp_path / "s.csv").write_text("sample-id,n\nA,1\n")
    msg = refused("submit", "r", "--from-csv", "s.csv", "--", "echo", "{sample-id}", cwd=tmp_path)
    assert "{sample-id}" in msg and "identifier" in msg
    assert not (tmp_path / "r").exists()


def test_parse_rules() -> None:
    cmd = Command(shell="awk '{print $1}' {line} ${HOME} {{x}} {1} {} {n:03d} { a; }")
    assert placeholders(cmd) == {"line", "1", "", "n"}
    argv = render(Command(argv=["{a}{", "}{b}", "${a}", "{{a}}", "{é}"]),
                  {"a": "A", "b": "B", "é": "E"})
    assert argv == ["A{", "}B", "${a}", "{a}", "E"]


# --- 3a. GNU parallel habits --------------------------------------------------------------------
def test_inline_args_gzip(tmp_path: Path) -> None:
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / name).write_text(f"content of {name}\n")
    n = submit_run(tmp_path, "--", "gzip", "-k", "{}", ":::", "a.txt", "b.txt", "c.txt")
    assert n == 3
    for name in ("a.txt", "b.txt", "c.txt"):
        assert gzip.decompress((tmp_path / f"{name}.gz").read_bytes()) == f"content of {name}\n".encode()


@pytest.mark.slow
def test_cross_product_in_gnu_parallel_order(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("X\n\nY\n")  # blank lines are not values
    n = submit_run(tmp_path, "--", "echo", "{1}-{2}-{3}", ":::", "a", "b", ":::", "1", "2",
                   "::::", "f.txt")
    assert n == 8
    assert b"".join(logs(tmp_path, n)).split() == [
        f"{a}-{b}-{c}".encode() for a in "ab" for b in "12" for c in "XY"]


@pytest.mark.slow
def test_four_colons_each_file_is_a_group(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("1\n2\n")
    (tmp_path / "y.txt").write_text("p\nq\n")
    n = submit_run(tmp_path, "--shell", "--", "echo {2}{1}", "::::", "x.txt", "y.txt")
    assert b"".join(logs(tmp_path, n)).split() == [b"p1", b"q1", b"p2", b"q2"]


@pytest.mark.slow
def test_values_are_appended_without_placeholders(tmp_path: Path) -> None:
    n = submit_run(tmp_path, "--", "echo", "v:", ":::", "a b", "c", ":::", "1")
    assert logs(tmp_path, n) == [b"v: a b 1\n", b"v: c 1\n"]


@pytest.mark.slow
def test_empty_braces_for_single_column_sources(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("one two\nthree\n")
    (tmp_path / "one.csv").write_text("name\nann\nbob\n")
    (tmp_path / "two.csv").write_text("name,age\nann,3\n")
    for args, want in [(["--array", "5-6"], [b"=5=\n", b"=6=\n"]),
                       (["--from-file", "in.txt"], [b"=one two=\n", b"=three=\n"]),
                       (["--from-csv", "one.csv"], [b"=ann=\n", b"=bob=\n"]),
                       (["--shell"], [b"=x=\n", b"=y y=\n"])]:
        if (tmp_path / "r").exists():
            shutil.rmtree(tmp_path / "r")
        if "--shell" in args:
            n = submit_run(tmp_path, "--shell", "--", "echo ={}=", ":::", "x", "y y")
        else:
            n = submit_run(tmp_path, *args, "--", "echo", "={}=")
        assert logs(tmp_path, n) == want, args
    msg = refused("submit", "r2", "--from-csv", "two.csv", "--", "echo", "{}", cwd=tmp_path)
    assert "{}" in msg and "single-column" in msg
    msg = refused("submit", "r2", "--", "echo", "{}", ":::", "a", ":::", "b", cwd=tmp_path)
    assert "{1}, {2}" in msg
    assert not (tmp_path / "r2").exists()


@pytest.mark.parametrize("tail", [[":::"], [":::", "a", ":::"], ["::::"], ["::::", "nofile"]])
@pytest.mark.slow
def test_bad_inline_groups_are_refused(tmp_path: Path, tail: list[str]) -> None:
    msg = refused("submit", "r", "--", "echo", "{}", *tail, cwd=tmp_path)
    assert ":::" in msg or "nofile" in msg
    assert not (tmp_path / "r").exists()


def test_inline_args_with_another_source_refused(tmp_path: Path) -> None:
    msg = refused("submit", "r", "--array", "1-2", "--", "echo", "{}", ":::", "a", cwd=tmp_path)
    assert "at most one" in msg


def test_split_inline_args() -> None:
    assert split_inline_args(["echo", "x"]) == (["echo", "x"], None)
    assert split_inline_args(["e", ":::", "a", "b", ":::", "c"]) == (["e"], [["a", "b"], ["c"]])


def test_help_teaches_gnu_parallel_syntax(tmp_path: Path) -> None:
    text = ok("submit", "--help", cwd=tmp_path).decode()
    assert "::: a.txt b.txt c.txt" in text and ":::: inputs.txt" in text
    assert "awk '{print $1}'" in text


# --- 2. submit mistakes: one line, exit 2, nothing left ------------------------------------------
@pytest.mark.slow
def test_non_utf8_template_argument_is_refused_naming_it(tmp_path: Path) -> None:
    msg = refused("submit", "r", "--", "echo", b"caf\xff", cwd=tmp_path)
    assert "caf\\xff" in msg and "UTF-8" in msg
    for opt in ("--tag", "--cwd", "--key"):  # stored as text too
        msg = refused("submit", "r", opt, b"t\xff", "--", "echo", "x", cwd=tmp_path)
        assert "t\\xff" in msg, msg
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_non_utf8_inline_values_reach_the_command_byte_exact(tmp_path: Path) -> None:
    prog = "import os, sys; sys.stdout.buffer.write(os.fsencode(sys.argv[1]))"
    n = submit_run(tmp_path, "--", sys.executable, "-c", prog, "{}", ":::", b"\xff\xfe name",
                   b"ok")
    assert logs(tmp_path, n) == [b"\xff\xfe name", b"ok"]


@pytest.mark.slow
def test_csv_cell_over_pythons_default_limit(tmp_path: Path) -> None:
    big = "A" * 200_000  # Python's csv module refuses cells over 128 KiB by default
    (tmp_path / "s.csv").write_text(f"name,seq\nx,{big}\ny,\"{big}\"\n")
    # a single argv element cannot exceed 128 KiB (Linux): the big cell is stored, not passed
    n = submit_run(tmp_path, "--from-csv", "s.csv", "--", "echo", "{name}")
    assert n == 2 and logs(tmp_path, n) == [b"x\n", b"y\n"]


def test_run_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("keep me")
    msg = refused("submit", "afile", "--", "echo", "hi", cwd=tmp_path)
    assert "afile exists and is not a run directory" in msg and "Errno" not in msg
    assert (tmp_path / "afile").read_text() == "keep me"


@pytest.mark.slow
def test_refused_submission_leaves_nothing_it_did_not_find(tmp_path: Path) -> None:
    refused("submit", "new/deep/run", "--array", "1-3", "--", "echo", "{nothere}", cwd=tmp_path)
    assert not (tmp_path / "new").exists()  # the parents it made are gone too
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n3\n")  # a short row, found after the first
    refused("submit", "r", "--from-csv", "bad.csv", "--", "echo", "{a}", cwd=tmp_path)
    assert not (tmp_path / "r").exists()
    (tmp_path / "mine").mkdir(mode=0o700)  # made by the user: stays, empty as it was
    refused("submit", "mine", "--array", "1-3", "--", "echo", "{nothere}", cwd=tmp_path)
    assert (tmp_path / "mine").is_dir()
    ok("submit", "r", "--array", "1-2", "--", "echo", "{index}", cwd=tmp_path)
    refused("submit", "r", "--array", "1-3", "--", "echo", "{nothere}", cwd=tmp_path)
    assert len(json.loads(ok("results", "r", "--format", "json", cwd=tmp_path))) == 2


@pytest.mark.slow
def test_large_submission_says_how_big_before_writing(tmp_path: Path) -> None:
    env = {"PIPEFARM_LARGE_SUBMISSION": "50000"}
    proc = pf("submit", "big", "--array", "0-99999", "--", "echo", "{index}", cwd=tmp_path,
              env=env)
    assert proc.returncode == 0, proc.stderr
    note = proc.stderr.splitlines()
    assert len(note) == 1 and "100,000 tasks" in note[0], proc.stderr
    m = re.search(r"about ([\d.,]+) MB", note[0])
    assert m, note
    actual = (tmp_path / "big" / "catalog.db").stat().st_size
    assert 0.6 < float(m.group(1).replace(",", "")) * 1e6 / actual < 1.6, (note, actual)
    proc = pf("submit", "small", "--array", "0-999", "--", "echo", "{index}", cwd=tmp_path,
              env=env)
    assert proc.returncode == 0 and proc.stderr == ""
    proc = pf("submit", "inline", "--", "echo", ":::", *map(str, range(300)), ":::",
              *map(str, range(200)), cwd=tmp_path, env=env)
    assert proc.returncode == 0 and "60,000 tasks" in proc.stderr


def test_catalog_estimate_for_the_reported_array() -> None:
    # the issue: --array 0-99999999 wrote a 6.9 GB catalog without a word
    est = catalog_estimate(100_000_000, 8)
    assert 5e9 < est < 8e9
    assert catalog_estimate(10, 0) == 10 * CATALOG_BYTES_PER_TASK


def test_ctrl_c_during_a_large_submission_leaves_nothing(tmp_path: Path) -> None:
    import signal

    proc = subprocess.Popen(
        [*PF, "submit", "big", "--array", "0-4999999", "--", "echo", "{index}"], cwd=tmp_path,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as at a terminal
    assert proc.stderr is not None
    note = proc.stderr.readline().decode()  # said before the first task is written
    assert "5,000,000 tasks" in note and "MB" in note, note
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    # click ends the ^C line first (a blank line), then one line of ours
    assert err.decode().split() == ["pipefarm:", "error:", "aborted"], err
    assert not (tmp_path / "big").exists()


class _TrackedRow(dict):
    """A source row that counts how many rows are alive at once (and the most ever)."""

    alive = 0
    most = 0

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        cls = type(self)
        cls.alive += 1
        cls.most = max(cls.most, cls.alive)

    def __del__(self) -> None:
        type(self).alive -= 1


def test_key_templates_stream_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``submit --key`` renders each key in the pass that writes its row: the source's rows
    are never all held in memory (sources.py promises streaming)."""
    import sqlite3

    from click.testing import CliRunner

    from pipefarm import sources
    from pipefarm.cli import main

    n = 20_000

    def many(spec: str):
        for i in range(n):
            yield _TrackedRow({"index": str(i)})

    monkeypatch.setattr(sources, "array_source", many)
    _TrackedRow.alive = _TrackedRow.most = 0
    got = CliRunner().invoke(main, ["submit", str(tmp_path / "r"), "--array", f"0-{n - 1}",
                                    "--key", "k{index}", "--", "echo", "{index}"])
    assert got.exit_code == 0, got.output
    assert f"({n:,})" in got.output, got.output
    assert _TrackedRow.most < 100, f"{_TrackedRow.most:,} of {n:,} rows were held at once"
    con = sqlite3.connect(tmp_path / "r" / "catalog.db")
    keys = [k for (k,) in con.execute("SELECT key FROM tasks ORDER BY id")]
    con.close()
    assert keys == [f"k{i}" for i in range(n)]

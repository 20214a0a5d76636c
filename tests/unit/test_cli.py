"""The ``pipefarm`` command line, end to end.

Every test runs real ``pipefarm`` processes (``python -m pipefarm``) on real commands, reads
back what they did through the CLI itself (``logs``, ``results``, ``status``, ``failures``) and
checks ``/proc`` for processes that should be gone. The lower layers (templates, output
extents, GPU pools, value sources) have their own unit tests; this file checks that the verbs
put them together the way a user sees them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

PF = [sys.executable, "-m", "pipefarm"]
PY = sys.executable
RESULT_COLUMNS = [
    "task_id", "key", "state", "attempts", "exit_code", "result", "error", "started_at",
    "ended_at", "duration_s", "worker",
]
MARK_VAR = "PIPEFARM_CLI_TEST_MARK"


# --- helpers ---------------------------------------------------------------------------------------
def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(MARK_VAR, None)
    env.update(extra)
    return env


def pf(*args: str | os.PathLike[str], cwd: Path, env: dict[str, str] | None = None,
       timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """Run one ``pipefarm`` process; stdout stays bytes (logs are binary), stderr is text."""
    proc = subprocess.run([*PF, *map(str, args)], cwd=cwd, env=env or _env(),
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    proc.stderr = proc.stderr.decode("utf-8", "replace")  # type: ignore[assignment]
    return proc


def pf_ok(*args: str | os.PathLike[str], cwd: Path, **kw) -> bytes:
    proc = pf(*args, cwd=cwd, **kw)
    assert proc.returncode == 0, (args, proc.returncode, proc.stderr)
    return proc.stdout


def pf_many(arg_lists: list[list[str]], cwd: Path, jobs: int = 4) -> list[subprocess.CompletedProcess]:
    """Several ``pipefarm`` processes at once (each one is mostly interpreter start-up)."""
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda a: pf(*a, cwd=cwd), arg_lists))


def submit(run: str, *args: str, cwd: Path) -> range:
    """``pipefarm submit``; returns the ids it reports ("added tasks 1-10 (10) to RUN")."""
    out = pf_ok("submit", run, *args, cwd=cwd).decode()
    m = re.fullmatch(r"added tasks? (\d+)(?:-(\d+))? \(([\d,]+)\) to .*\n", out)
    assert m, out
    first = int(m.group(1))
    last = int(m.group(2) or first)
    assert last - first + 1 == int(m.group(3).replace(",", ""))
    return range(first, last + 1)


def run_all(run: str, *args: str, cwd: Path, expect: int = 0, env: dict[str, str] | None = None) -> str:
    proc = pf("run", run, "--no-progress", *args, cwd=cwd, env=env)
    assert proc.returncode == expect, (proc.returncode, proc.stderr)
    return proc.stderr


def results_json(run: str, cwd: Path) -> list[dict]:
    out = pf_ok("results", run, "--format", "jsonl", cwd=cwd).decode()
    return [json.loads(line) for line in out.splitlines()]


def status_json(run: str, cwd: Path) -> dict:
    return json.loads(pf_ok("status", run, "--json", cwd=cwd))


def logs_of(run: str, ids: list[int], cwd: Path, *extra: str) -> dict[int, bytes]:
    procs = pf_many([["logs", run, str(t), *extra] for t in ids], cwd)
    out = {}
    for t, p in zip(ids, procs, strict=True):
        assert p.returncode == 0, (t, p.stderr)
        out[t] = p.stdout
    return out


def _proc_table() -> dict[int, dict]:
    """Every process now: state, ppid, start time, argv and whether it carries the test mark."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    environ = f.read()
            except OSError:
                environ = b""
        except OSError:
            continue  # gone while we looked
        table[int(name)] = {
            "state": fields[0].decode(),
            "ppid": int(fields[1]),
            "start": int(fields[19]),
            "argv": [a.decode("utf-8", "replace") for a in argv if a],
            "environ": environ,
        }
    return table


def _alive(p: dict) -> bool:
    return p["state"] not in ("Z", "X")  # a zombie has ended; only its exit status is left


def _marked_alive(mark: str) -> list[dict]:
    needle = f"{MARK_VAR}={mark}".encode() + b"\0"
    return [p for p in _proc_table().values() if needle in p["environ"] + b"\0" and _alive(p)]


def _descendants(pid: int) -> dict[int, dict]:
    table = _proc_table()
    found: dict[int, dict] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, p in table.items():
            if p["ppid"] == parent and child not in found:
                found[child] = p
                frontier.append(child)
    return found


def _wait_until(cond, timeout: float, step: float = 0.05):
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if value or time.monotonic() > end:
            return value
        time.sleep(step)


# --- placeholders from every source --------------------------------------------------------------
@pytest.mark.slow
def test_array_source_fills_index_and_format_spec(tmp_path: Path) -> None:
    ids = submit("r", "--array", "0-9", "--", "printf", "i=%s p=%s\\n", "{index}", "{index:03d}",
                 cwd=tmp_path)
    assert len(ids) == 10
    run_all("r", "--workers", "2", cwd=tmp_path)
    logs = logs_of("r", list(ids), tmp_path)
    for i, t in enumerate(ids):
        assert logs[t] == f"i={i} p={i:03d}\n".encode()


@pytest.mark.slow
def test_file_source_fills_line_and_fields(tmp_path: Path) -> None:
    lines = ["alpha beta", "  gamma\tdelta  extra ", "x y", "", "last one"]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    ids = submit("r", "--from-file", "in.txt", "--", "printf", "[%s][%s][%s]", "{line}", "{0}",
                 "{1}", cwd=tmp_path)
    kept = [ln for ln in lines if ln.strip()]  # blank lines make no task
    assert len(ids) == len(kept)
    run_all("r", "--workers", "2", cwd=tmp_path)
    logs = logs_of("r", list(ids), tmp_path)
    for line, t in zip(kept, ids, strict=True):
        f = line.split()
        assert logs[t] == f"[{line}][{f[0]}][{f[1]}]".encode()


@pytest.mark.slow
def test_csv_source_fills_columns_and_key_template(tmp_path: Path) -> None:
    rows = [("0.1", "3", "plain"), ("0.25", "-7", "with, comma"), ("1e-3", "0", 'quote " x')]
    with open(tmp_path / "params.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["alpha", "beta", "label"])
        w.writerows(rows)
    ids = submit("r", "--from-csv", "params.csv", "--key", "a{alpha}-b{beta}", "--",
                 "printf", "%s|%s|%s", "{alpha}", "{beta}", "{label}", cwd=tmp_path)
    run_all("r", "--workers", "2", cwd=tmp_path)
    logs = logs_of("r", list(ids), tmp_path)
    res = {r["task_id"]: r for r in results_json("r", tmp_path)}
    for (a, b, label), t in zip(rows, ids, strict=True):
        assert logs[t] == f"{a}|{b}|{label}".encode()
        assert res[t]["key"] == f"a{a}-b{b}"
        assert res[t]["state"] == "succeeded"


def test_json_source_list_of_objects(tmp_path: Path) -> None:
    objs = [
        {"name": "first", "n": 1, "flag": True, "nothing": None, "nested": [1, 2]},
        {"name": "sécond ✓", "n": 2.5, "flag": False, "nothing": None, "nested": {"k": "v"}},
    ]
    (tmp_path / "p.json").write_text(json.dumps(objs, ensure_ascii=False))
    ids = submit("r", "--from-json", "p.json", "--", "printf", "%s;%s;%s;%s;%s", "{name}", "{n}",
                 "{flag}", "{nothing}", "{nested}", cwd=tmp_path)
    run_all("r", "--workers", "2", cwd=tmp_path)
    logs = logs_of("r", list(ids), tmp_path)
    assert logs[ids[0]] == b"first;1;true;;[1,2]"
    assert logs[ids[1]] == 'sécond ✓;2.5;false;;{"k":"v"}'.encode()


@pytest.mark.slow
def test_after_env_and_cwd(tmp_path: Path) -> None:
    (tmp_path / "done").mkdir()
    first = submit("r", "--array", "0-3", "--", "sh", "-c", "sleep 0.2; : > done/{index}",
                   cwd=tmp_path)
    span = f"{first[0]}-{first[-1]}"
    (dep,) = submit("r", "--after", span, "--env", "GREETING=hello world", "--env", "EQ=a=b",
                    "--", "sh", "-c", 'ls done | wc -l; printf "%s|%s\\n" "$GREETING" "$EQ"',
                    cwd=tmp_path)
    dirs = [tmp_path / "dir one", tmp_path / "dir two"]
    for d in dirs:
        d.mkdir()
    (tmp_path / "dirs.txt").write_text("".join(f"{d}\n" for d in dirs))
    cwd_ids = submit("r", "--from-file", "dirs.txt", "--cwd", "{line}", "--", "pwd", cwd=tmp_path)
    run_all("r", "--workers", "2", cwd=tmp_path)

    logs = logs_of("r", [dep, *cwd_ids], tmp_path)
    assert logs[dep].split(b"\n")[0].strip() == b"4"  # every dependency had finished
    assert logs[dep].split(b"\n")[1] == b"hello world|a=b"
    res = {r["task_id"]: r for r in results_json("r", tmp_path)}
    assert res[dep]["started_at"] >= max(res[t]["ended_at"] for t in first)
    for d, t in zip(dirs, cwd_ids, strict=True):
        assert os.path.realpath(logs[t].decode().rstrip("\n")) == os.path.realpath(d)


# --- hostile values --------------------------------------------------------------------------------
HOSTILE = [
    "$(rm -rf ~)",
    "$(touch PWNED1)",
    "`touch PWNED2`",
    "x; touch PWNED3",
    "x | touch PWNED4",
    "x && touch PWNED5",
    "> PWNED6",
    "'; touch PWNED7; '",
    '"; touch PWNED8; "',
    "\ntouch PWNED9\n",
    "it's",
    'say "hi"',
    "two\nlines\n",
    "  spaced   out  ",
    "*",
    "semi;colon",
    "back`tick",
    "$HOME ${HOME}",
    "tab\there",
    "back\\slash",
    "-n",
    "",
    "é ✓",
]

ARGV_SCRIPT = """\
import json, os, sys
stem = os.path.join(sys.argv[1], os.environ["PIPEFARM_TASK_ID"])
with open(stem + ".json", "w") as f:
    json.dump(sys.argv[2:], f)
with open(stem + ".raw", "wb") as f:
    f.write(os.fsencode(sys.argv[2]))
"""


@pytest.mark.parametrize("mode", ["argv", "shell"])
@pytest.mark.slow
def test_hostile_values_reach_the_program_byte_exact(tmp_path: Path, mode: str) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "canary").write_text("still here")
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "argv.py").write_text(ARGV_SCRIPT)
    (tmp_path / "v.json").write_text(json.dumps([{"v": v} for v in HOSTILE]))
    prog = [PY, "-I", "-S", str(tmp_path / "argv.py"), str(out), "{v}", "pre{v}post"]
    if mode == "argv":
        ids = submit("r", "--from-json", "v.json", "--", *prog, cwd=tmp_path)
    else:
        line = " ".join(shlex.quote(a) if "{" not in a else a for a in prog)
        # a pipe and a redirection: this really runs under /bin/sh
        line += ' && printf %s {v} | cat > "out/$PIPEFARM_TASK_ID.printf"'
        ids = submit("r", "--shell", "--from-json", "v.json", "--", line, cwd=tmp_path)
    env = _env(HOME=str(home))
    run_all("r", "--workers", "2", cwd=tmp_path, env=env)

    for v, t in zip(HOSTILE, ids, strict=True):
        assert json.loads((out / f"{t}.json").read_text()) == [v, f"pre{v}post"], repr(v)
        assert (out / f"{t}.raw").read_bytes() == v.encode(), repr(v)
        if mode == "shell":
            assert (out / f"{t}.printf").read_bytes() == v.encode(), repr(v)
    assert not [p for p in tmp_path.rglob("*PWNED*")], "a value was executed"
    assert (home / "canary").read_text() == "still here"


# --- timeouts --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def timed_out_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, range, range]:
    """Two tasks past a 1 s timeout: one whose children die on SIGTERM, one that ignores it."""
    d = tmp_path_factory.mktemp("timeout")
    mark = uuid.uuid4().hex
    forked = submit("r", "--timeout", "1", "--env", f"{MARK_VAR}={mark}", "--",
                    "sh", "-c", "sleep 1000 & sleep 1000", cwd=d)
    stubborn = submit("r", "--timeout", "1", "--env", f"{MARK_VAR}={mark}", "--", PY, "-c",
                      "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                      "print('ignoring SIGTERM', flush=True); time.sleep(1000)", cwd=d)
    t0 = time.monotonic()
    err = run_all("r", "--workers", "2", cwd=d, expect=1)
    assert time.monotonic() - t0 < 20, err
    return d, mark, forked, stubborn


@pytest.mark.slow
def test_timeout_kills_the_whole_process_group(timed_out_run) -> None:
    d, mark, (task,), (stubborn,) = timed_out_run
    # nothing the tasks started is left (a zombie waiting for init to reap it has ended)
    left = _wait_until(lambda: not _marked_alive(mark), 3.0) or _marked_alive(mark)
    assert left is True, [p["argv"] for p in left]
    sleeps = [p for p in _proc_table().values()
              if p["argv"] == ["sleep", "1000"] and _alive(p) and mark.encode() in p["environ"]]
    assert not sleeps

    res = {r["task_id"]: r for r in results_json("r", d)}
    assert res[task]["state"] == "failed"
    assert "timed out" in res[task]["error"]
    assert res[stubborn]["state"] == "failed" and "timed out" in res[stubborn]["error"]
    st = status_json("r", d)
    assert st["counts"]["failed"] == 2 and st["total"] == 2
    assert {f["task_id"] for f in st["last_failures"]} == {task, stubborn}
    assert all("timed out" in f["error"] for f in st["last_failures"])

    import pipefarm as pfm  # the attempt's outcome is not a CLI column: read it, read-only

    with pfm.Run.open(d / "r") as run:
        assert [a.outcome for a in run.attempts(task)] == ["timed_out"]
        assert [a.outcome for a in run.attempts(stubborn)] == ["timed_out"]

    groups = json.loads(pf_ok("failures", "r", "--json", cwd=d))
    assert sum(g["count"] for g in groups) == 2
    assert all("timed out" in g["signature"] for g in groups)
    text = pf_ok("failures", "r", cwd=d).decode()
    assert "timed out" in text


@pytest.mark.slow
def test_timeouts_form_one_failure_group(timed_out_run) -> None:
    d, *_ = timed_out_run
    groups = json.loads(pf_ok("failures", "r", "--json", cwd=d))
    assert [(g["count"], g["signature"]) for g in groups] == [(2, "timed out")]


# --- exit codes and retries ------------------------------------------------------------------------
@pytest.mark.slow
def test_retries_until_success(tmp_path: Path) -> None:
    script = ('n=$(cat count 2>/dev/null || echo 0); n=$((n+1)); echo $n > count; '
              'echo "attempt $n" >&2; [ "$n" -ge 3 ]')
    (task,) = submit("r", "--retries", "2", "--", "sh", "-c", script, cwd=tmp_path)
    run_all("r", "--workers", "2", cwd=tmp_path)
    assert (tmp_path / "count").read_text() == "3\n"
    st = status_json("r", tmp_path)
    assert st["counts"]["succeeded"] == 1 and st["total"] == 1 and not st["last_failures"]
    (row,) = results_json("r", tmp_path)
    assert (row["task_id"], row["state"], row["attempts"], row["exit_code"]) == (task, "succeeded", 3, 0)
    latest, *each = pf_many([["logs", "r", str(task), "--stderr"]]
                            + [["logs", "r", str(task), "--attempt", str(n), "--stderr"]
                               for n in (1, 2, 3)], tmp_path)
    assert latest.stdout == b"attempt 3\n"
    assert [p.stdout for p in each] == [b"attempt 1\n", b"attempt 2\n", b"attempt 3\n"]


@pytest.mark.slow
def test_failures_grouped_by_exit_code_and_message(tmp_path: Path) -> None:
    script = ('if [ $(( {index} % 3 )) -eq 0 ]; then '
              'echo "fatal: input {index} is corrupt at byte {index}7" >&2; '
              'else echo "processing {index}" >&2; '
              'echo "error: value {index}.5 out of range [0, 1]" >&2; fi; exit 3')
    ids = submit("r", "--array", "0-29", "--", "sh", "-c", script, cwd=tmp_path)
    err = run_all("r", "--workers", "2", cwd=tmp_path, expect=1)
    assert "30 task(s) did not succeed" in err

    res = results_json("r", tmp_path)
    assert [r["task_id"] for r in res] == list(ids)
    assert all(r["state"] == "failed" and r["exit_code"] == 3 for r in res)
    groups = json.loads(pf_ok("failures", "r", "--json", cwd=tmp_path))
    assert [g["count"] for g in groups] == [20, 10]
    big, small = groups
    assert big["signature"].startswith("exit 3: ") and "out of range" in big["signature"]
    assert small["signature"].startswith("exit 3: ") and "is corrupt at byte" in small["signature"]
    assert not re.search(r"\d", big["signature"][len("exit 3"):] + small["signature"][len("exit 3"):])
    assert sorted(small["task_ids"]) == [ids[i] for i in range(0, 30, 3)]
    text = pf_ok("failures", "r", cwd=tmp_path).decode()
    assert "30 failed task(s) in 2 group(s)" in text
    assert big["signature"] in text and small["signature"] in text


# --- output ----------------------------------------------------------------------------------------
BIG = 5 << 20
BIG_CODE = ("import sys; sys.stdout.buffer.write("
            f"b''.join(b'%07d\\n' % i for i in range({BIG // 8 + 1}))[:{BIG}])")


def _big_output() -> bytes:
    """What BIG_CODE prints."""
    return b"".join(b"%07d\n" % i for i in range(BIG // 8 + 1))[:BIG]


@pytest.fixture(scope="module")
def output_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, int]:
    d = tmp_path_factory.mktemp("output")
    (big,) = submit("r", "--output-cap", "65536", "--", PY, "-c", BIG_CODE, cwd=d)
    (binary,) = submit("r", "--", PY, "-c",
                       "import sys; sys.stdout.buffer.write(bytes(range(256)) * 3); "
                       "sys.stderr.buffer.write(bytes(reversed(range(256))))", cwd=d)
    run_all("r", "--workers", "2", cwd=d)
    return d, big, binary


@pytest.mark.slow
def test_huge_output_is_capped(output_run) -> None:
    d, big, _ = output_run
    data = _big_output()
    assert len(data) == BIG
    shown = pf_ok("logs", "r", str(big), cwd=d)
    # the head and the tail within the cap, a marker line where bytes were cut
    head, marker, tail = re.fullmatch(rb"(.*\n)(\[pipefarm: [\d,]+ bytes cut\]\n)(.*)", shown,
                                      re.S).groups()
    assert len(shown) == 65536 and head == data[:32768] and data.endswith(tail)
    assert int(marker[11:].split(b" ")[0].replace(b",", b"")) == BIG - len(head) - len(tail)
    import pipefarm as pfm

    with pfm.Run.open(d / "r") as run:
        (attempt,) = run.attempts(big)
    assert attempt.outcome == "succeeded"
    assert "cut at 65536" in (attempt.note or ""), attempt.note


def test_output_cut_is_visible_from_the_cli(output_run) -> None:
    d, big, _ = output_run
    row = next(r for r in results_json("r", d) if r["task_id"] == big)
    shown = json.dumps(row) + pf_ok("status", "r", "--json", cwd=d).decode() + \
        pf_ok("status", "r", cwd=d).decode()
    assert "cut at 65536" in shown


def test_binary_output_byte_exact(output_run) -> None:
    d, _, binary = output_run
    out, err = pf_many([["logs", "r", str(binary)], ["logs", "r", str(binary), "--stderr"]], d)
    assert out.returncode == 0 and err.returncode == 0
    assert out.stdout == bytes(range(256)) * 3
    assert err.stdout == bytes(reversed(range(256)))


def _log_files(run_dir: Path) -> list[Path]:
    return [p for p in (run_dir / "logs").rglob("*")
            if p.is_file() and not re.fullmatch(r"python-.*\.log", p.name)]


@pytest.mark.slow
def test_ten_thousand_tasks_share_a_few_log_files(tmp_path: Path) -> None:
    ids = submit("r", "--array", "0-9999", "--", "printf", "task %s\\n", "{index}", cwd=tmp_path)
    assert len(ids) == 10_000
    run_all("r", "--workers", "2", cwd=tmp_path)
    res = results_json("r", tmp_path)
    assert len(res) == 10_000 and all(r["state"] == "succeeded" for r in res)
    workers = {r["worker"] for r in res}
    files = _log_files(tmp_path / "r")
    assert 1 <= len(files) <= min(4, 2 * len(workers)), files
    sample = random.Random(1234).sample(list(ids), 50)
    logs = logs_of("r", sample, tmp_path)
    for t in sample:
        assert logs[t] == f"task {t - ids[0]}\n".encode()


@pytest.mark.slow
def test_output_per_task_gives_one_file_per_task(tmp_path: Path) -> None:
    ids = submit("r", "--array", "0-99", "--output-per-task", "--", "printf", "task %s\\n",
                 "{index}", cwd=tmp_path)
    run_all("r", "--workers", "2", cwd=tmp_path)
    files = _log_files(tmp_path / "r")
    assert len(files) == 100
    assert sorted(int(p.name.split(".")[0]) for p in files) == list(ids)
    for p in files:
        t = int(p.name.split(".")[0])
        assert p.read_bytes() == f"task {t - ids[0]}\n".encode()
    sample = random.Random(5).sample(list(ids), 4)
    logs = logs_of("r", sample, tmp_path)
    assert all(logs[t] == f"task {t - ids[0]}\n".encode() for t in sample)


# --- GPUs ------------------------------------------------------------------------------------------
RECORD = ('printf "%s %s " "$CUDA_VISIBLE_DEVICES" "$(date +%s.%N)" > rec/{tag}{index}; '
          'sleep 0.3; date +%s.%N >> rec/{tag}{index}')


def _records(d: Path, tag: str) -> list[tuple[list[str], float, float]]:
    recs = []
    for p in sorted((d / "rec").glob(f"{tag}*")):
        devs, start, end = p.read_text().split()
        recs.append((devs.split(","), float(start), float(end)))
    return recs


def _no_overlapping_sharing(recs: list[tuple[list[str], float, float]]) -> None:
    for i, (da, sa, ea) in enumerate(recs):
        for db, sb, eb in recs[i + 1:]:
            if sa < eb and sb < ea:  # ran at the same time
                assert not set(da) & set(db), (da, sa, ea, db, sb, eb)


@pytest.mark.parametrize("per_task,n", [(1, 12), (2, 4)])
@pytest.mark.slow
def test_gpus_are_never_shared(tmp_path: Path, per_task: int, n: int) -> None:
    (tmp_path / "rec").mkdir()
    tag = f"g{per_task}-"
    submit("r", "--array", f"0-{n - 1}", "--gpus", str(per_task), "--", "sh", "-c",
           RECORD.replace("{tag}", tag), cwd=tmp_path)
    run_all("r", "--workers", "4", "--gpus-available", "0,1,2", cwd=tmp_path)
    recs = _records(tmp_path, tag)
    assert len(recs) == n
    for devs, start, end in recs:
        assert len(devs) == per_task and len(set(devs)) == per_task, devs
        assert set(devs) <= {"0", "1", "2"}
        assert start < end
    _no_overlapping_sharing(recs)
    if per_task == 1:  # the check above is not vacuous: tasks did run at the same time
        assert any(s < e0 and s0 < e for i, (_, s0, e0) in enumerate(recs)
                   for _, s, e in recs[i + 1:])


# --- SIGKILL of the coordinator --------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_of_run_then_resume(tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    n = 2000
    ids = submit("r", "--array", f"0-{n - 1}", "--", "sh", "-c", "echo {index} >> markers/{index}",
                 cwd=tmp_path)
    mark = uuid.uuid4().hex
    proc = subprocess.Popen([*PF, "run", "r", "--workers", "2", "--no-progress"], cwd=tmp_path,
                            env=_env(**{MARK_VAR: mark}), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        started = _wait_until(lambda: len(os.listdir(markers)) >= 150 or proc.poll() is not None, 60)
        assert started and proc.poll() is None, "the run ended before it could be killed"
        family = _descendants(proc.pid)
        assert sum(1 for p in family.values() if p["argv"][:1] == PF[:1]) >= 2, family
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done_before = len(os.listdir(markers))
    assert done_before < n

    def survivors() -> list[dict]:
        now = _proc_table()
        left = [p for pid, p in family.items()
                if pid in now and now[pid]["start"] == p["start"] and _alive(now[pid])]
        return left + _marked_alive(mark)

    left = _wait_until(lambda: not survivors(), 10.0) or survivors()
    assert left is True, [(p["state"], p["argv"]) for p in left]

    err = run_all("r", "--workers", "2", cwd=tmp_path)
    res = results_json("r", tmp_path)
    assert len(res) == n, err
    assert sorted(r["task_id"] for r in res) == list(ids)
    assert all(r["state"] == "succeeded" for r in res)
    st = status_json("r", tmp_path)
    assert st["counts"]["succeeded"] == n and st["total"] == n
    for i in range(n):  # each ran at least once (a task killed mid-way may have run twice)
        lines = (markers / str(i)).read_text().split()
        assert lines and set(lines) == {str(i)}


# --- exit statuses and error messages --------------------------------------------------------------
@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("small")
    submit("ok", "--", "echo", "hi", cwd=d)
    run_all("ok", cwd=d)
    (d / "p.csv").write_text("alpha,beta\n1,2\n3,4\n")
    (d / "short.txt").write_text("a b\nc\n")
    return d


ERRORS = [
    pytest.param(["frobnicate"], None, id="unknown-verb"),
    pytest.param(["status"], None, id="missing-run"),
    pytest.param(["status", "nope"], None, id="status-no-such-run"),
    pytest.param(["run", "nope"], None, id="run-no-such-run"),
    pytest.param(["results", "nope"], None, id="results-no-such-run"),
    pytest.param(["logs", "nope", "1"], None, id="logs-no-such-run"),
    pytest.param(["logs", "ok", "99"], None, id="logs-unknown-task"),
    pytest.param(["submit", "new", "--from-csv", "p.csv", "--", "echo", "{gamma}"], "new",
                 id="placeholder-not-in-csv"),
    pytest.param(["submit", "new", "--", "echo", "{x}"], "new", id="placeholder-no-source"),
    pytest.param(["submit", "new", "--from-file", "short.txt", "--", "echo", "{0}", "{1}"], "new",
                 id="placeholder-missing-in-later-row"),
    pytest.param(["submit", "ok", "--array", "0-2", "--", "echo", "{line}"], "ok",
                 id="placeholder-existing-run"),
    pytest.param(["submit", "new", "--array", "0-3", "--from-csv", "p.csv", "--", "echo"], "new",
                 id="two-sources"),
    pytest.param(["submit", "new", "--array", "1-x", "--", "echo", "{index}"], "new", id="bad-array"),
    pytest.param(["submit", "new", "--array", "5-1", "--", "echo", "{index}"], "new", id="bad-array-reversed"),
    pytest.param(["submit", "new", "--env", "NOEQUALS", "--", "echo"], "new", id="bad-env"),
    pytest.param(["submit", "new", "--after", "x", "--", "echo"], "new", id="bad-after"),
    pytest.param(["submit", "new", "--after", "999", "--", "echo"], "new", id="after-unknown-id"),
    pytest.param(["submit", "new", "--timeout", "-1", "--", "echo"], "new", id="negative-timeout"),
    pytest.param(["submit", "new", "--from-csv", "missing.csv", "--", "echo", "{a}"], "new",
                 id="missing-csv"),
    pytest.param(["results", "ok", "--format", "xml"], None, id="bad-format"),
]


@pytest.mark.parametrize("args,untouched", ERRORS)
@pytest.mark.slow
def test_errors_are_one_line_and_exit_2(small_run: Path, args: list[str], untouched: str | None) -> None:
    before = None
    if untouched is not None and (small_run / untouched / "catalog.db").exists():
        before = status_json(untouched, small_run)["total"]
    proc = pf(*args, cwd=small_run)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stderr.count("\n") == 1 and proc.stderr.endswith("\n"), proc.stderr
    assert proc.stderr.startswith("pipefarm: error: "), proc.stderr
    assert proc.stdout == b""
    if untouched is not None:  # nothing written: no run, or a run without new tasks
        if (small_run / untouched / "catalog.db").exists():
            assert status_json(untouched, small_run)["total"] == (before or 0)


def test_run_exit_status_reflects_failures(tmp_path: Path) -> None:
    submit("good", "--array", "0-2", "--", "true", cwd=tmp_path)
    submit("mixed", "--array", "0-2", "--", "sh", "-c", "exit $(( {index} == 1 ))", cwd=tmp_path)
    good, mixed = pf_many([["run", "good", "--no-progress", "-w", "1"],
                           ["run", "mixed", "--no-progress", "-w", "1"]], tmp_path)
    assert good.returncode == 0, good.stderr
    assert mixed.returncode == 1, mixed.stderr
    assert "1 task(s) did not succeed" in mixed.stderr


@pytest.mark.slow
def test_every_verb_has_help_with_an_example(tmp_path: Path) -> None:
    from pipefarm.cli import main

    verbs = sorted(main.commands)
    assert {"submit", "run", "status", "results", "logs", "retry", "cancel", "failures"} <= set(verbs)
    procs = pf_many([["--help"]] + [[v, "--help"] for v in verbs], tmp_path)
    assert procs[0].returncode == 0 and b"pipefarm submit " in procs[0].stdout
    for verb, p in zip(verbs, procs[1:], strict=True):
        assert p.returncode == 0, (verb, p.stderr)
        text = p.stdout.decode()
        assert re.search(rf"^\s*pipefarm {verb} \S", text, re.M), (verb, text)


# --- results export --------------------------------------------------------------------------------
@pytest.mark.slow
def test_results_parquet_csv_json(tmp_path: Path) -> None:
    pa_parquet = pytest.importorskip("pyarrow.parquet")
    ids = submit("r", "--array", "0-2", "--key", "k{index}", "--", "sh", "-c",
                 'if [ {index} = 2 ]; then echo "broken {index}" >&2; exit 4; fi', cwd=tmp_path)
    run_all("r", "-w", "2", cwd=tmp_path, expect=1)
    a, b, c, d = pf_many([["results", "r", "-o", "f.parquet"],
                          ["results", "r", "--format", "parquet", "-o", "g.out"],
                          ["results", "r", "--format", "csv"],
                          ["results", "r", "--format", "jsonl"]], tmp_path)
    for p in (a, b, c, d):
        assert p.returncode == 0, p.stderr

    expect = {ids[0]: ("k0", "succeeded", 0), ids[1]: ("k1", "succeeded", 0),
              ids[2]: ("k2", "failed", 4)}
    for name in ("f.parquet", "g.out"):
        table = pa_parquet.read_table(tmp_path / name)
        assert table.column_names[:len(RESULT_COLUMNS)] == RESULT_COLUMNS
        rows = table.to_pylist()
        assert {r["task_id"]: (r["key"], r["state"], r["exit_code"]) for r in rows} == expect
        assert all(r["attempts"] == 1 and r["worker"] for r in rows)
        bad = next(r for r in rows if r["state"] == "failed")
        assert "exit code 4" in bad["error"] and "broken 2" in bad["error"]
        for r in rows:
            assert r["ended_at"] >= r["started_at"]
            took = (r["ended_at"] - r["started_at"]).total_seconds()  # UTC timestamps
            assert r["duration_s"] == pytest.approx(took, abs=2e-6)

    rows_csv = list(csv.DictReader(io.StringIO(c.stdout.decode())))
    assert list(rows_csv[0].keys())[:len(RESULT_COLUMNS)] == RESULT_COLUMNS
    assert {int(r["task_id"]): (r["key"], r["state"], int(r["exit_code"])) for r in rows_csv} == expect

    rows_json = [json.loads(line) for line in d.stdout.decode().splitlines()]
    assert [list(r.keys())[:len(RESULT_COLUMNS)] for r in rows_json] == [RESULT_COLUMNS] * 3
    assert {r["task_id"]: (r["key"], r["state"], r["exit_code"]) for r in rows_json} == expect


def test_bad_format_spec_refused_at_submission(tmp_path: Path) -> None:
    r = pf("submit", "r", "--array", "0-3", "--", "echo", "{index:zz}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("pipefarm: error:") and "format" in r.stderr
    assert r.stderr.count("\n") == 1
    db = tmp_path / "r" / "catalog.db"
    if db.exists():
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        assert con.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0
        con.close()

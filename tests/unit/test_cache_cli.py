"""The result cache from the command line: ``submit --cache`` with input files, ``status`` and
``results`` showing ``cached``, and ``pipefarm cache stats|list|clear``. Real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipefarm.cache.entries import ResultCache

PF = [sys.executable, "-m", "pipefarm"]


def pf(*args: str, cwd: Path, env: dict[str, str], ok: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([*PF, *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=120)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PIPEFARM_CACHE": str(tmp_path / "cache")}


def sweep(name: str, tmp: Path, env: dict[str, str], *extra: str) -> None:
    pf("submit", name, "--cache", "--cache-input", "{}", "--cache-env", "SALT", *extra,
       "--shell", "--", "cat {} >> ran.log; wc -c < {}", ":::", "a.txt", "b.txt", "c.txt",
       cwd=tmp, env=env)
    pf("run", name, cwd=tmp, env=env)


def outcomes(name: str, tmp: Path, env: dict[str, str]) -> list[str]:
    out = pf("results", name, "--format", "json", cwd=tmp, env=env).stdout
    return [r["outcome"] for r in json.loads(out)]


@pytest.mark.slow
def test_command_tasks_are_keyed_by_their_input_files_content(tmp_path: Path, env) -> None:
    for n in "abc":
        (tmp_path / f"{n}.txt").write_text(f"{n}1\n")
    sweep("r1", tmp_path, env)
    sweep("r2", tmp_path, env)
    assert sorted((tmp_path / "ran.log").read_text().split()) == ["a1", "b1", "c1"]
    assert outcomes("r2", tmp_path, env) == ["cached"] * 3
    status = pf("status", "r2", cwd=tmp_path, env=env).stdout
    assert "cached: 3 of the succeeded tasks came from the result cache" in status

    (tmp_path / "b.txt").write_text("b2\n")  # one input changes: that task alone runs
    sweep("r3", tmp_path, env)
    assert (tmp_path / "ran.log").read_text().split()[3:] == ["b2"]
    assert outcomes("r3", tmp_path, env) == ["cached", "succeeded", "cached"]

    sweep("r4", tmp_path, {**env, "SALT": "x"})  # a --cache-env variable's value is keyed
    assert len((tmp_path / "ran.log").read_text().split()) == 7

    bad = pf("submit", "r5", "--cache", "--cache-input", "{nope}", "--", "cat", "{}", ":::",
             "a.txt", cwd=tmp_path, env=env, ok=False)
    assert bad.returncode == 2 and "{nope}" in bad.stderr and not (tmp_path / "r5").exists()


@pytest.mark.slow
def test_cache_stats_list_and_clear(tmp_path: Path, env) -> None:
    for n in "abc":
        (tmp_path / f"{n}.txt").write_text(n)
    sweep("r1", tmp_path, env)
    pf("submit", "r2", "--cache", "--", "echo", "{}", ":::", "1", "2", cwd=tmp_path, env=env)
    pf("run", "r2", cwd=tmp_path, env=env)

    stats = pf("cache", "stats", cwd=tmp_path, env=env).stdout
    assert "entries   5" in stats and "cat" in stats and "echo" in stats, stats
    lines = pf("cache", "list", "--function", "echo", cwd=tmp_path, env=env).stdout.splitlines()
    assert len(lines) == 2 and all(" echo " in x for x in lines)

    # entries written an hour ago: make the cat ones old by rewriting their time
    with ResultCache(tmp_path / "cache") as c:
        old = [e.key for e in c.entries() if e.name == "cat"]
    _age(tmp_path / "cache", old, 3600)
    assert pf("cache", "list", "--older-than", "30m", cwd=tmp_path, env=env).stdout.count(
        "\n") == 3
    out = pf("cache", "clear", "--older-than", "30m", "--function", "echo", cwd=tmp_path,
             env=env).stdout
    assert out.startswith("removed 0 entries"), out  # the echo entries are new
    out = pf("cache", "clear", "--older-than", "30m", cwd=tmp_path, env=env).stdout
    assert out.startswith("removed 3 entries") and "; 2 left" in out, out
    out = pf("cache", "clear", "--function", "echo", cwd=tmp_path, env=env).stdout
    assert out.startswith("removed 2 entries") and "; 0 left" in out, out

    bad = pf("cache", "clear", "--older-than", "soon", cwd=tmp_path, env=env, ok=False)
    assert bad.returncode == 2 and "not an age such as 30d" in bad.stderr
    assert "cache list --function" in pf("cache", "--help", cwd=tmp_path, env=env).stdout


def _age(cache: Path, keys: list[bytes], seconds: float) -> None:
    """Rewrite the cache so that ``keys`` were written ``seconds`` earlier (through its own
    compaction: the entries are read, then written back with the older time)."""
    with ResultCache(cache) as c:
        keep = []
        for key, loc in sorted(c.index.items(), key=lambda kv: kv[1]):
            t, name, result, blob = c._entry(loc)
            keep.append((key, t - seconds if key in keys else t, name, result, blob))
        packs = list((cache / "packs").glob("*.pack"))
        c.close()
        c._write_compacted(keep)
    for p in packs:
        p.unlink()

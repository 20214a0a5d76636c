"""Every snippet of README.md runs as written (real processes, in a temporary directory).

- Each fenced ``python`` block runs as a script of its own (a reader copies one block at a time),
  in a fresh directory.
- The ``console``, ``sh`` and ``bash`` blocks run in README order in one shared directory, as a
  reader following the page would: every ``$ `` line of a console block (other lines are the
  output shown), every line of an sh/bash block, each with ``sh`` and with this Python's
  ``pipefarm`` first on ``PATH``; each must exit 0. The directory holds a stand-in for
  ``./simulate`` (the README says it stands for the reader's program): it prints its arguments.
- A block preceded by ``<!-- snippet: cluster ... -->`` needs a batch scheduler. It runs against
  the real SLURM of this machine, with one change that is explained here: ``--elements N -w M``
  becomes ``--elements 1 -w 1`` and ``--poll 2`` is added, because this machine has 2 cores
  (16 elements of 4 workers would never be scheduled) and a test should not wait 30 s per poll.
  Without ``sbatch`` it is skipped, saying so.

Untagged blocks (``make demo``, the source layout) are not commands of pipefarm and are not run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
CLUSTER = re.compile(r"<!--\s*snippet:\s*cluster\b[^>]*-->\s*$")

#: seconds one README command may take (a run of a few tasks; an array on a queued SLURM)
COMMAND_TIMEOUT_S = 120
CLUSTER_TIMEOUT_S = 300

SIMULATE = """#!/bin/sh
# stands for the reader's program in the README's examples
echo "simulate $*"
"""


def blocks() -> list[tuple[str, str, bool, int]]:
    """``(language, body, cluster, line)`` of every fenced block, in README order."""
    text = README.read_text()
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        line = text.count("\n", 0, m.start()) + 1
        out.append((m.group(1).lower(), m.group(2), bool(CLUSTER.search(before)), line))
    return out


def commands(lang: str, body: str) -> list[str]:
    """The command lines of a console (``$ `` lines) or sh/bash block; ``\\`` continues."""
    lines, out, cont = body.splitlines(), [], ""
    for raw in lines:
        if lang == "console":
            if cont:
                raw = raw.strip()
            elif raw.startswith("$ "):
                raw = raw[2:]
            else:
                continue  # output shown
        if not cont and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.rstrip().endswith("\\"):
            cont += raw.rstrip()[:-1] + " "
            continue
        out.append(cont + raw)
        cont = ""
    return out


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    e["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "src")
    return e


def run_line(line: str, cwd: Path, timeout: float = COMMAND_TIMEOUT_S) -> None:
    p = subprocess.run(["sh", "-c", line], cwd=cwd, env=env(), capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"README command failed ({p.returncode}): {line}\n{p.stderr[-2000:]}"
    assert "Traceback" not in p.stderr, f"{line}\n{p.stderr[-2000:]}"


PY = [(body, line) for lang, body, _, line in blocks() if lang == "python"]
SHELL = [(lang, body, cluster, line) for lang, body, cluster, line in blocks()
         if lang in ("console", "sh", "bash", "shell")]


def test_readme_has_snippets_and_no_dangling_links():
    assert len(PY) >= 2 and len(SHELL) >= 2
    text = README.read_text()
    assert "../shared/" not in text  # a user's clone has only this repository
    for target in re.findall(r"\]\(((?!http|#)[^)]+)\)", text):
        assert (README.parent / target.split("#")[0]).exists(), target


@pytest.mark.parametrize(("body", "line"), PY, ids=[f"line{line}" for _, line in PY])
@pytest.mark.slow
def test_python_snippet_runs(tmp_path, body, line):
    script = tmp_path / "snippet.py"
    script.write_text(body)
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env(),
                       capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    assert p.returncode == 0, f"README.md line {line}:\n{p.stderr[-3000:]}"


def _shell_dir(tmp_path: Path) -> Path:
    sim = tmp_path / "simulate"
    sim.write_text(SIMULATE)
    sim.chmod(0o755)
    return tmp_path


@pytest.mark.slow
def test_command_line_snippets_run_in_order(tmp_path):
    cwd = _shell_dir(tmp_path)
    ran = 0
    for lang, body, cluster, _line in SHELL:
        if cluster:
            continue  # test_cluster_snippets_run_on_slurm
        for cmd in commands(lang, body):
            run_line(cmd, cwd)
            ran += 1
    assert ran >= 5


def _on_this_machine(cmd: str) -> str:
    """A cluster command sized for this 2-core machine (see the module docstring)."""
    if " array " not in f" {cmd} " or "--scheduler" not in cmd:
        return cmd
    cmd = re.sub(r"--elements \d+", "--elements 1", cmd)
    cmd = re.sub(r"(-w|--workers-per-element) \d+", r"\1 1", cmd)
    if "--wait" in cmd:
        cmd = cmd.replace("--wait", "--wait --poll 2")
    return cmd


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="no SLURM here (no sbatch)")
@pytest.mark.slow
def test_cluster_snippets_run_on_slurm(tmp_path):
    cwd = _shell_dir(tmp_path)
    # the cluster section follows the command line one: its inputs (params.csv) come from there
    for lang, body, cluster, _line in SHELL:
        if not cluster:
            for cmd in commands(lang, body):
                if not cmd.startswith("pipefarm"):
                    run_line(cmd, cwd)  # inputs only
    clusters = [(lang, body) for lang, body, cluster, _ in SHELL if cluster]
    assert clusters, "mark scheduler snippets with <!-- snippet: cluster -->"
    for lang, body in clusters:
        for cmd in commands(lang, body):
            run_line(_on_this_machine(cmd), cwd, timeout=CLUSTER_TIMEOUT_S)
    out = subprocess.run([sys.executable, "-m", "pipefarm", "status", "runs/sweep", "--json"],
                         cwd=cwd, env=env(), capture_output=True, text=True, timeout=60)
    assert '"succeeded": 3' in out.stdout, out.stdout

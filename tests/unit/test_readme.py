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
- A block preceded by ``<!-- snippet: engines ... -->`` needs an engine (mpiexec and mpi4py,
  dask.distributed, ray); it runs in its place in README order, with the engine missing it is absent
  service (skipped, or failed under ``PIPEFARM_REQUIRE_SERVICES=1``). Its commands get the two
  settings Open MPI needs on a CI machine and a reader does not: running as root, and more
  ranks than cores.

Untagged blocks (``make demo``, the source layout) are not commands of pipefarm and are not run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import service_absent

README = Path(__file__).resolve().parents[2] / "README.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
TAG = re.compile(r"<!--\s*snippet:\s*(\w+)\b[^>]*-->\s*$")

#: seconds one README command may take (a run of a few tasks; an array on a queued SLURM)
COMMAND_TIMEOUT_S = 120
CLUSTER_TIMEOUT_S = 300

SIMULATE = """#!/bin/sh
# stands for the reader's program in the README's examples
echo "simulate $*"
"""


def blocks() -> list[tuple[str, str, str, int]]:
    """``(language, body, tag, line)`` of every fenced block, in README order; the tag is the
    ``<!-- snippet: TAG -->`` comment's word just before it, or ``""``."""
    text = README.read_text()
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        line = text.count("\n", 0, m.start()) + 1
        tag = TAG.search(before)
        out.append((m.group(1).lower(), m.group(2), tag.group(1) if tag else "", line))
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


def env(tag: str = "") -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    e["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "src")
    if tag == "engines":  # see the module docstring
        e.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                 OMPI_MCA_rmaps_base_oversubscribe="1")
    return e


def run_line(line: str, cwd: Path, timeout: float = COMMAND_TIMEOUT_S, tag: str = "") -> None:
    p = subprocess.run(["sh", "-c", line], cwd=cwd, env=env(tag), capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"README command failed ({p.returncode}): {line}\n{p.stderr[-2000:]}"
    assert "Traceback" not in p.stderr, f"{line}\n{p.stderr[-2000:]}"


def require_engines() -> None:
    """The engines the ``engines`` snippets use: mpiexec with mpi4py, dask.distributed, ray."""
    from mpi_lib import require_mpi

    require_mpi()
    if importlib.util.find_spec("distributed") is None:
        service_absent("dask.distributed is not installed (pip install 'pipefarm[dask]')")
    if importlib.util.find_spec("ray") is None:
        service_absent("ray is not installed (pip install 'pipefarm[ray]')")


PY = [(body, tag, line) for lang, body, tag, line in blocks() if lang == "python"]
SHELL = [(lang, body, tag, line) for lang, body, tag, line in blocks()
         if lang in ("console", "sh", "bash", "shell")]


def test_readme_has_snippets_and_no_dangling_links():
    assert len(PY) >= 2 and len(SHELL) >= 2
    text = README.read_text()
    assert "../shared/" not in text  # a user's clone has only this repository
    for target in re.findall(r"\]\(((?!http|#)[^)]+)\)", text):
        assert (README.parent / target.split("#")[0]).exists(), target


@pytest.mark.parametrize(("body", "tag", "line"), PY, ids=[f"line{line}" for _, _, line in PY])
@pytest.mark.slow
def test_python_snippet_runs(tmp_path, body, tag, line):
    if tag == "engines":
        require_engines()
    script = tmp_path / "snippet.py"
    script.write_text(body)
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env(tag),
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
    if any(tag == "engines" for _, _, tag, _ in SHELL):
        require_engines()
    ran = 0
    for lang, body, tag, _line in SHELL:
        if tag == "cluster":
            continue  # test_cluster_snippets_run_on_slurm
        for cmd in commands(lang, body):
            run_line(cmd, cwd, tag=tag)
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
    for lang, body, tag, _line in SHELL:
        if not tag:
            for cmd in commands(lang, body):
                if not cmd.startswith("pipefarm"):
                    run_line(cmd, cwd)  # inputs only
    clusters = [(lang, body) for lang, body, tag, _ in SHELL if tag == "cluster"]
    assert clusters, "mark scheduler snippets with <!-- snippet: cluster -->"
    for lang, body in clusters:
        for cmd in commands(lang, body):
            run_line(_on_this_machine(cmd), cwd, timeout=CLUSTER_TIMEOUT_S)
    out = subprocess.run([sys.executable, "-m", "pipefarm", "status", "runs/sweep", "--json"],
                         cwd=cwd, env=env(), capture_output=True, text=True, timeout=60)
    assert '"succeeded": 3' in out.stdout, out.stdout

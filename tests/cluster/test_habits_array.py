"""Generated scheduler scripts an HPC admin would sign (issue 8, "the habits users bring").

* ``pipefarm array ... --dry-run > job.sh`` is a script the real ``sbatch`` and SGE ``qsub``
  take as is, and it runs the tasks to completion, also from a run directory with a space;
* ``--mem`` / ``--mem-per-worker`` in each scheduler's own syntax, ``--pe``, ``--setup`` lines
  run in order before the workers (which see what they export), ``--python`` checked;
* user mistakes (``--time abc``, ``--time 0``, a warning not shorter than the walltime, bad
  sizes, a path a scheduler cannot take, ``worker`` on a run that does not exist) are one line
  and exit 2 from a real ``pipefarm`` process, leaving nothing behind.

PBS Pro, LSF and HTCondor cannot be installed here: their directives are checked against
their documented syntax only (said where it happens). The SLURM and SGE tests need the
single-host schedulers that .ci/run starts; without them they skip, and with
PIPEFARM_REQUIRE_SERVICES=1 they fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_lib import SGE_ENV, sge_up, slurm_up
from conftest import service_absent

from pipefarm.backends.array import ArraySpec, render

PF = [sys.executable, "-m", "pipefarm"]


def pf(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*PF, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def make_run(where: Path, name: str, n: int = 4, *cmd: str) -> Path:
    r = pf("submit", name, "--array", f"0-{n - 1}", "--", *(cmd or ("true",)), cwd=where)
    assert r.returncode == 0, r.stderr
    return where / name


def counts(run: Path) -> dict[str, int]:
    r = pf("status", str(run), "--json", cwd=run.parent)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["counts"]


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """The single ``pipefarm: error:`` line of a refused command (exit 2, no traceback)."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipefarm: error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


# --- the dry run is a script the real schedulers take as is ---------------------------------------
@pytest.mark.scheduler
def test_slurm_dry_run_output_submitted_as_is_runs_to_completion(tmp_path: Path) -> None:
    """stdout of --dry-run starts with #!, carries --mem and --setup, quotes the log path of a
    run directory with a space, and `sbatch job.sh` runs every task."""
    if not slurm_up():
        service_absent("no SLURM here (see ../shared/ci/slurm-up.sh)")
    run = make_run(tmp_path, "my run", 6)
    r = pf("array", str(run), "--scheduler", "slurm", "--elements", "2", "-w", "2",
           "--time", "5", "--mem-per-worker", "100M", "--setup", "export PF_HABIT=1",
           "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("#!/bin/bash\n"), r.stdout[:200]
    assert "#SBATCH --mem=200M" in r.stdout.splitlines()
    assert f'#SBATCH --output="{run}/logs/%x-%A_%a.out"' in r.stdout.splitlines()
    assert "wrote" in r.stderr and "nothing submitted" in r.stderr
    job = tmp_path / "job.sh"
    job.write_text(r.stdout)
    s = subprocess.run(["sbatch", "--parsable", "--wait", str(job)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert s.returncode == 0, (s.stdout, s.stderr)
    assert counts(run)["succeeded"] == 6
    logs = sorted((run / "logs").glob("pipefarm-*_*.out"))
    assert len(logs) == 2, logs


@pytest.mark.scheduler
def test_sge_dry_run_output_submitted_as_is_runs_to_completion(tmp_path: Path) -> None:
    """The same with the real SGE qsub: h_vmem, -pe with a named environment, the quoted log
    path of a run directory with a space."""
    if not sge_up():
        service_absent("no Grid Engine here")
    run = make_run(tmp_path, "my run", 6)
    r = pf("array", str(run), "--scheduler", "sge", "--elements", "2", "-w", "2",
           "--time", "00:05:00", "--mem", "2G", "--pe", "smp", "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert "#$ -pe smp 2" in lines and "#$ -l h_vmem=1G" in lines  # per slot: 2G / 2
    assert f'#$ -o "{run}/logs/pipefarm.$JOB_ID.$TASK_ID.out"' in lines
    job = tmp_path / "job.sh"
    job.write_text(r.stdout)
    env = {**os.environ, **SGE_ENV}
    s = subprocess.run(["qsub", "-sync", "y", "-terse", str(job)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert s.returncode == 0, (s.stdout, s.stderr)
    assert counts(run)["succeeded"] == 6
    assert len(list((run / "logs").glob("pipefarm.*.out"))) == 2


def test_htcondor_dry_run_prints_a_usable_submit_description(tmp_path: Path) -> None:
    """HTCondor cannot run here: the printed description (documented syntax) names a wrapper
    that exists and is executable, and stdout holds nothing but the description."""
    run = make_run(tmp_path, "run")
    r = pf("array", str(run), "--scheduler", "htcondor", "--mem", "3G", "--dry-run",
           cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert not any(ln.startswith("#!") or ln.startswith("# ---") for ln in lines)
    wrapper = Path(next(ln for ln in lines if ln.startswith("executable = ")).split(" = ")[1])
    assert wrapper.is_file() and os.access(wrapper, os.X_OK)
    assert "request_memory = 3072" in lines and lines[-1] == "queue 1"
    assert wrapper.name in r.stderr


def test_writing_without_dry_run_or_submit_says_where_and_how(tmp_path: Path) -> None:
    run = make_run(tmp_path, "run")
    r = pf("array", str(run), "--scheduler", "slurm", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    script = run / "array" / "pipefarm.slurm.sh"
    assert script.is_file()
    assert f"wrote {script}; submit it with: sbatch --parsable {script}" in r.stdout
    h = pf("array", "--help", cwd=tmp_path).stdout
    assert "writes the submit script" in h and "verbatim" in " ".join(h.split())


# --- memory, parallel environment, two-field walltimes per scheduler ------------------------------
def directives(scheduler: str, spec: ArraySpec) -> list[str]:
    r = render(scheduler, spec)
    return r.files[r.submit].splitlines()


def test_memory_in_each_schedulers_syntax() -> None:
    """SLURM and SGE as the real ones take them (see the tests above); PBS Pro, LSF and
    HTCondor by their documented syntax only (they cannot be installed here)."""
    per_worker = ArraySpec("/r", 2, workers_per_element=4, mem_per_worker="1.5G")
    assert per_worker.mem_mib == 6144
    assert "#SBATCH --mem=6G" in directives("slurm", per_worker)
    assert "#PBS -l select=1:ncpus=4:mem=6gb" in directives("pbs", per_worker)
    assert "#$ -l h_vmem=1536M" in directives("sge", per_worker)  # per slot, 4 slots
    assert '#BSUB -R "rusage[mem=6144MB]"' in directives("lsf", per_worker)
    assert "request_memory = 6144" in directives("htcondor", per_worker)
    odd = ArraySpec("/r", 1, mem="4500")  # a bare number is MiB
    assert "#SBATCH --mem=4500M" in directives("slurm", odd)
    assert "#$ -l h_vmem=4500M" in directives("sge", odd)  # one slot: no -pe
    none = directives("slurm", ArraySpec("/r", 1))
    assert not any("--mem" in d for d in none)


def test_parallel_environment_and_two_field_walltimes() -> None:
    spec = ArraySpec("/r", 1, cpus_per_worker=4, parallel_env="mpislots")
    assert "#$ -pe mpislots 4" in directives("sge", spec)
    from pipefarm.backends.array import time_seconds

    assert time_seconds("2:00", "slurm") == 120  # SLURM: MM:SS
    assert time_seconds("2:00", "pbs") == 120  # PBS Pro walltime: [[HH:]MM:]SS
    assert time_seconds("2:00", "lsf") == 7200  # LSF -W: [HH:]MM
    with pytest.raises(ValueError, match="no two-field form"):
        time_seconds("2:00", "sge")


def test_two_field_time_through_the_cli(tmp_path: Path) -> None:
    run = make_run(tmp_path, "run")
    slurm = pf("array", str(run), "--scheduler", "slurm", "--time", "30:00", "--dry-run",
               cwd=tmp_path)
    assert "#SBATCH --time=00:30:00" in slurm.stdout.splitlines(), slurm.stderr
    lsf = pf("array", str(run), "--scheduler", "lsf", "--time", "2:00", "--dry-run",
             cwd=tmp_path)
    assert "#BSUB -W 2:00" in lsf.stdout.splitlines(), lsf.stderr  # 2 hours, as LSF reads it


# --- --setup and --python ---------------------------------------------------------------------------
def test_setup_lines_run_in_order_before_the_workers(tmp_path: Path) -> None:
    """The generated script, run by a real bash as an element would: the second setup line
    sees the first's export, and the tasks see both."""
    out = tmp_path / "seen"
    run = make_run(tmp_path, "run", 2, "sh", "-c", f'echo "$PF_B" >> {out}')
    r = pf("array", str(run), "--scheduler", "slurm", "--time", "5",
           "--setup", "export PF_A=one", "--setup", 'export PF_B="$PF_A-two"', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "not the python of the --setup environment" in r.stderr
    script = run / "array" / "pipefarm.slurm.sh"
    text = script.read_text()
    assert f"# Python: {sys.executable}" in text
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    b = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert b.returncode == 0, b.stderr
    assert out.read_text().splitlines() == ["one-two", "one-two"]
    assert counts(run)["succeeded"] == 2


def test_a_failing_setup_line_stops_the_element_before_any_worker(tmp_path: Path) -> None:
    run = make_run(tmp_path, "run", 2)
    r = pf("array", str(run), "--scheduler", "slurm", "--setup", "module-that-is-not-here x",
           cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    b = subprocess.run(["bash", str(run / "array" / "pipefarm.slurm.sh")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert b.returncode == 1
    assert "pipefarm: --setup line 1 failed (status 127): module-that-is-not-here x" in b.stderr
    assert "worker done" not in b.stderr
    assert counts(run)["succeeded"] == 0


def test_python_checked_and_node_local_python_warned(tmp_path: Path) -> None:
    run = make_run(tmp_path, "run")
    local = tmp_path / "py"  # tmp_path lies under /tmp (or $TMPDIR): node-local
    local.symlink_to(sys.executable)
    r = pf("array", str(run), "--scheduler", "slurm", "--python", str(local), "--dry-run",
           cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    warn = [ln for ln in r.stderr.splitlines() if ln.startswith("pipefarm: warning:")]
    assert len(warn) == 1 and "local to this node" in warn[0], r.stderr
    assert f"PIPEFARM_PYTHON={local}" in r.stdout
    bare = pf("array", str(run), "--scheduler", "slurm", "--python", "python3", "--dry-run",
              cwd=tmp_path)
    assert bare.returncode == 0, bare.stderr
    assert "PIPEFARM_PYTHON=python3" in bare.stdout
    assert "as found on PATH after the --setup lines" in bare.stdout


# --- mistakes: one line, exit 2, nothing left behind ------------------------------------------------
MISTAKES = [
    (["--scheduler", "slurm", "--time", "abc"], "bad walltime 'abc'"),
    (["--scheduler", "slurm", "--time", "0"], "walltime must be positive"),
    (["--scheduler", "slurm", "--time", "2:00"], "--time 2:00 is 120 s for slurm"),
    (["--scheduler", "sge", "--time", "2:00"], "sge has no two-field form"),
    (["--scheduler", "slurm", "--time", "01:00:00", "--warn-seconds", "3600"], "not shorter"),
    (["--scheduler", "slurm", "--mem", "4X"], "bad memory size '4X'"),
    (["--scheduler", "slurm", "--mem", "0"], "under 1 MiB"),
    (["--scheduler", "slurm", "--mem", "1G", "--mem-per-worker", "1G"], "not both"),
    (["--scheduler", "sge", "--pe", "a b"], "parallel environment"),
    (["--scheduler", "slurm", "--setup", ""], "setup line"),
    (["--scheduler", "slurm", "--python", "/no/such/python"], "does not exist"),
    (["--scheduler", "pbs"], "white space"),  # the run directory below has a space
    (["--scheduler", "htcondor"], "white space"),
]


@pytest.mark.parametrize(("args", "says"), MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "write"])
def test_array_mistakes_are_one_line(tmp_path: Path, args: list[str], says: str,
                                     dry: bool) -> None:
    run = make_run(tmp_path, "a run")
    r = pf("array", str(run), *args, *(["--dry-run"] if dry else []), cwd=tmp_path)
    assert says in one_error_line(r)
    assert r.stdout == ""
    assert sorted(p.name for p in run.iterdir()) == ["catalog.db"]  # nothing exported, written


def test_worker_on_a_run_that_does_not_exist(tmp_path: Path) -> None:
    r = pf("worker", "runs/nonexist", cwd=tmp_path)
    line = one_error_line(r)
    assert "run runs/nonexist does not exist" in line and "exported" not in line
    assert not (tmp_path / "runs").exists()

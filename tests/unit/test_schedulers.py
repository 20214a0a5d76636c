"""Scheduler submit scripts: exact directives, and the generated scripts run for real.

The scripts are run locally with ``bash`` and each scheduler's array variables set. ``python``
is replaced by a small fake interpreter that records its argv, environment and signals:
``pipefarm worker`` is written separately, and what is under test here is the script (index
normalisation, worker launch, signal forwarding, waiting), not the worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cluster_lib import SGE_ENV, sge_up, slurm_up
from conftest import service_absent

from pipefarm.backends import array as S
from pipefarm.backends.array import (
    ArraySpec,
    launch_command,
    parse_job_id,
    parse_state,
    poll_state,
    render,
    state_command,
    submit_command,
    write_scripts,
)


def directives(text: str, prefix: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith(prefix)]


def script_of(scheduler: str, spec: ArraySpec) -> str:
    r = render(scheduler, spec)
    return r.files[r.submit]


# ---------------------------------------------------------------------------------- directives
def test_slurm_directives():
    spec = ArraySpec(
        "/runs/a", 10, workers_per_element=2, time="1-02:03:04", partition="gpu",
        account="proj1", cpus_per_worker=3, gpus_per_worker=1, throttle=4,
        extra=["--mem=8G", "#SBATCH --qos=long"], job_name="sweep", warn_seconds=300,
        log_dir="/logs",
    )  # fmt: skip
    assert directives(script_of("slurm", spec), "#SBATCH") == [
        "#SBATCH --job-name=sweep",
        "#SBATCH --array=0-9%4",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        "#SBATCH --cpus-per-task=6",
        "#SBATCH --gres=gpu:2",
        "#SBATCH --time=1-02:03:04",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj1",
        "#SBATCH --signal=B:TERM@300",
        "#SBATCH --output=/logs/%x-%A_%a.out",
        "#SBATCH --mem=8G",
        "#SBATCH --qos=long",
    ]


def test_slurm_single_element_and_defaults():
    text = script_of("slurm", ArraySpec("/r", 1, time=90, throttle=5))
    d = directives(text, "#SBATCH")
    assert not any("--array" in x for x in d)  # throttle means nothing for one element
    assert "#SBATCH --time=01:30:00" in d
    assert "#SBATCH --output=/r/logs/%x-%j.out" in d
    assert "#SBATCH --signal=B:TERM@120" in d
    assert not any("gres" in x or "partition" in x or "account" in x for x in d)
    assert text.startswith("#!/bin/bash\n#SBATCH")
    # every directive precedes the first command (sbatch stops reading at it)
    lines = text.splitlines()
    first_cmd = next(i for i, ln in enumerate(lines) if ln and not ln.startswith("#"))
    assert all(i < first_cmd for i, ln in enumerate(lines) if ln.startswith("#SBATCH"))
    assert directives(script_of("slurm", ArraySpec("/r", 2)), "#SBATCH --array") == [
        "#SBATCH --array=0-1"
    ]


def test_pbs_directives():
    spec = ArraySpec(
        "/runs/a", 10, workers_per_element=2, time="48:00:00", partition="workq",
        account="proj1", cpus_per_worker=3, gpus_per_worker=1, throttle=4,
        extra=["-l place=scatter"], log_dir="/logs",
    )  # fmt: skip
    assert directives(script_of("pbs", spec), "#PBS") == [
        "#PBS -N pipefarm",
        "#PBS -J 0-9%4",
        "#PBS -l select=1:ncpus=6:ngpus=2",
        "#PBS -l walltime=48:00:00",
        "#PBS -q workq",
        "#PBS -A proj1",
        "#PBS -S /bin/bash",
        "#PBS -j oe",
        "#PBS -o /logs",
        "#PBS -l place=scatter",
    ]


def test_pbs_single_element_has_no_J():
    # PBS Pro refuses a -J range with fewer than two indices
    d = directives(script_of("pbs", ArraySpec("/r", 1, throttle=3)), "#PBS")
    assert not any(x.startswith("#PBS -J") for x in d)
    assert "#PBS -l select=1:ncpus=1" in d
    assert not any("walltime" in x for x in d)
    assert directives(script_of("pbs", ArraySpec("/r", 2)), "#PBS -J") == ["#PBS -J 0-1"]


def test_sge_directives():
    spec = ArraySpec(
        "/runs/a", 10, workers_per_element=2, time="02:00:00", partition="all.q",
        account="proj1", cpus_per_worker=3, gpus_per_worker=1, throttle=4,
        extra=["-l h_vmem=4G"], warn_seconds=600, log_dir="/logs",
    )  # fmt: skip
    assert directives(script_of("sge", spec), "#$") == [
        "#$ -S /bin/bash",
        "#$ -N pipefarm",
        "#$ -t 1-10",
        "#$ -tc 4",
        "#$ -pe smp 6",
        "#$ -l h_rt=02:00:00",
        "#$ -l s_rt=01:50:00",
        "#$ -l gpu=2",
        "#$ -q all.q",
        "#$ -A proj1",
        "#$ -notify",
        "#$ -j y",
        "#$ -o /logs/pipefarm.$JOB_ID.$TASK_ID.out",
        "#$ -l h_vmem=4G",
    ]


def test_sge_single_element_and_small_limits():
    with pytest.raises(ValueError, match="not shorter than the walltime"):
        ArraySpec("/r", 1, time="00:01:00")  # the 120 s warning would come before the start
    spec = ArraySpec("/r", 1, time="00:01:00", throttle=2, warn_seconds=0)
    d = directives(script_of("sge", spec), "#$")
    assert "#$ -t 1-1" in d  # legal in SGE, keeps $SGE_TASK_ID defined
    assert not any(x.startswith("#$ -tc") or x.startswith("#$ -pe") for x in d)
    assert "#$ -l h_rt=00:01:00" in d
    assert not any("s_rt" in x for x in d)  # no warning asked for


def test_lsf_directives():
    spec = ArraySpec(
        "/runs/a", 10, workers_per_element=2, time="01:30:20", partition="normal",
        account="proj1", cpus_per_worker=3, gpus_per_worker=1, throttle=4,
        extra=['-R "rusage[mem=4000]"'], warn_seconds=90, log_dir="/logs",
    )  # fmt: skip
    assert directives(script_of("lsf", spec), "#BSUB") == [
        '#BSUB -J "pipefarm[1-10]%4"',
        "#BSUB -n 6",
        '#BSUB -R "span[hosts=1]"',
        '#BSUB -gpu "num=2"',
        "#BSUB -W 1:31",  # minutes, rounded up
        "#BSUB -q normal",
        "#BSUB -P proj1",
        "#BSUB -wa TERM",
        "#BSUB -wt 2",
        "#BSUB -o /logs/pipefarm.%J.%I.out",
        '#BSUB -R "rusage[mem=4000]"',
    ]
    d = directives(script_of("lsf", ArraySpec("/r", 1, throttle=9)), "#BSUB")
    assert d[0] == "#BSUB -J pipefarm"


def test_htcondor_submit_description(tmp_path):
    spec = ArraySpec(
        "/runs/a", 10, workers_per_element=2, time=60, account="group_x", partition="ignored",
        cpus_per_worker=3, gpus_per_worker=1, throttle=4, extra=["+ProjectName = \"p\""],
        log_dir="/logs",
    )  # fmt: skip
    r = render("htcondor", spec, str(tmp_path))
    assert r.submit == "pipefarm.htcondor.sub"
    assert r.executables == ["pipefarm.htcondor.sh"]
    lines = r.files[r.submit].splitlines()
    for want in [
        "universe = vanilla",
        f"executable = {tmp_path}/pipefarm.htcondor.sh",
        "arguments = $(Process)",
        "output = /logs/pipefarm.$(Cluster).$(Process).out",
        "error = /logs/pipefarm.$(Cluster).$(Process).err",
        "log = /logs/pipefarm.$(Cluster).log",
        "request_cpus = 6",
        "request_gpus = 2",
        "+MaxRuntime = 3600",
        "periodic_remove = (JobStatus == 2) && ((time() - EnteredCurrentStatus) > 3600)",
        "kill_sig = SIGTERM",
        "accounting_group = group_x",
        "max_materialize = 4",
        '+ProjectName = "p"',
    ]:
        assert want in lines, want
    assert lines[-1] == "queue 10"
    assert lines.index('+ProjectName = "p"') < len(lines) - 1
    one = render("htcondor", ArraySpec("/r", 1, throttle=2)).files["pipefarm.htcondor.sub"]
    assert one.splitlines()[-1] == "queue 1" and "max_materialize" not in one
    assert "request_gpus" not in one and "MaxRuntime" not in one


def test_spec_validation():
    with pytest.raises(ValueError):
        ArraySpec("/r", 0)
    with pytest.raises(ValueError):
        ArraySpec("/r", 2, throttle=0)
    with pytest.raises(ValueError, match="job_name"):
        ArraySpec("/r", 2, job_name="1 bad name")
    with pytest.raises(ValueError, match="walltime"):
        ArraySpec("/r", 2, time="10:00")  # ambiguous: SLURM mm:ss, PBS/LSF hh:mm
    with pytest.raises(ValueError, match="walltime"):
        ArraySpec("/r", 2, time="1:75:00")
    with pytest.raises(ValueError):
        ArraySpec("/r", 2, signal="KILL")
    with pytest.raises(ValueError, match="spans lines"):
        ArraySpec("/r", 2, extra=["--mem=1G\nrm -rf /"])
    with pytest.raises(ValueError, match="unknown scheduler"):
        render("torque", ArraySpec("/r", 2))
    assert ArraySpec("/r", 2, signal="SIGUSR1").signal == "USR1"
    assert ArraySpec("/r", 2, signal="usr2").signal == "USR2"
    assert S.time_seconds("30") == 1800 and S.time_seconds(30) == 1800
    assert S.time_seconds("2-00:00:01") == 172801 and S.time_seconds(None) is None


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = script_of("slurm", ArraySpec("runs/x", 2, python="venv/bin/python"))
    assert f"PIPEFARM_RUN_DIR={tmp_path}/runs/x" in text
    assert f"PIPEFARM_PYTHON={tmp_path}/venv/bin/python" in text
    assert f"#SBATCH --output={tmp_path}/runs/x/logs/%x-%A_%a.out" in text
    assert "PIPEFARM_PYTHON=python3\n" in script_of("slurm", ArraySpec("r", 2, python="python3"))
    quoted = script_of("slurm", ArraySpec("/runs/with space", 2))
    assert "PIPEFARM_RUN_DIR='/runs/with space'" in quoted


def test_write_scripts(tmp_path):
    run = tmp_path / "run"
    spec = ArraySpec(str(run), 3)
    path = write_scripts("htcondor", spec)
    assert path == run / "array" / "pipefarm.htcondor.sub"
    assert (run / "logs").is_dir()
    assert os.access(run / "array" / "pipefarm.htcondor.sh", os.X_OK)
    assert oct((run / "array").stat().st_mode & 0o777) == "0o700"
    p = write_scripts("slurm", spec, str(tmp_path / "elsewhere"))
    assert p.read_text() == script_of("slurm", spec)


# --------------------------------------------------------------------- submission and polling
def test_submit_commands():
    assert submit_command("slurm", "/a/s.sh").argv == ["sbatch", "--parsable", "/a/s.sh"]
    assert submit_command("pbs", "/a/s.sh").argv == ["qsub", "/a/s.sh"]
    assert submit_command("sge", "/a/s.sh").argv == ["qsub", "-terse", "/a/s.sh"]
    assert submit_command("htcondor", "/a/s.sub").argv == ["condor_submit", "/a/s.sub"]
    lsf = submit_command("lsf", "/a/s.sh")
    assert lsf.argv == ["bsub"] and lsf.stdin == "/a/s.sh"  # bsub < script
    assert submit_command("slurm", "/a/s.sh").stdin is None


def test_cancel_commands():
    # the scheduler interface's fourth verb (directives, submit, query, cancel): the whole array
    assert S.cancel_command("slurm", "1234") == ["scancel", "1234"]
    assert S.cancel_command("pbs", "1234[].pbs01") == ["qdel", "1234[].pbs01"]
    assert S.cancel_command("sge", "3") == ["qdel", "3"]
    assert S.cancel_command("htcondor", "17") == ["condor_rm", "17"]
    assert S.cancel_command("lsf", "4242") == ["bkill", "4242"]


@pytest.mark.parametrize(
    "scheduler,out,want",
    [
        ("slurm", "1234\n", "1234"),
        ("slurm", "9;ci\n", "9"),  # --parsable with a cluster name (seen on the CI SLURM)
        ("pbs", "1234[].pbs01\n", "1234[].pbs01"),
        ("pbs", "77.server\n", "77.server"),
        ("sge", 'Your job-array 3.1-4:1 ("sgearr") has been submitted\n', "3"),
        ("sge", 'Your job 5 ("x") has been submitted\n', "5"),
        ("sge", "4.1-4:1\n", "4"),  # -terse, array
        ("sge", "6\n", "6"),  # -terse
        ("htcondor", "Submitting job(s)....\n4 job(s) submitted to cluster 17.\n", "17"),
        ("htcondor", "17.0 - 17.3\n", "17"),
        ("lsf", "Job <4242> is submitted to queue <normal>.\n", "4242"),
    ],
)
def test_parse_job_id(scheduler, out, want):
    assert parse_job_id(scheduler, out) == want


def test_parse_job_id_refuses_garbage():
    for sch in S.SCHEDULERS:
        with pytest.raises(ValueError):
            parse_job_id(sch, "error: something went wrong")


def test_parse_state_slurm():
    assert parse_state("slurm", "PENDING\nRUNNING\nRUNNING\n") == "running"
    assert parse_state("slurm", "PENDING\n") == "pending"
    assert parse_state("slurm", "", 0) == "unknown"  # left the queue
    assert parse_state("slurm", "", 1) == "unknown"  # "Invalid job id specified"
    assert parse_state("slurm", "COMPLETED\nCOMPLETED\n", step=1) == "done"
    assert parse_state("slurm", "COMPLETED\nCANCELLED by 0\n", step=1) == "failed"
    assert parse_state("slurm", "TIMEOUT\n", step=1) == "failed"
    assert state_command("slurm", "7") == ["squeue", "-h", "-j", "7", "-o", "%T"]
    assert state_command("slurm", "7", 1)[0] == "sacct"
    # without accounting the controller still knows an ended job for MinJobAge
    assert state_command("slurm", "7", 2)[:2] == ["scontrol", "-o"]
    assert parse_state("slurm", "JobId=8 ArrayTaskId=0 JobState=COMPLETED Reason=None\n"
                       "JobId=9 ArrayTaskId=1 JobState=CANCELLED Reason=None\n", step=2) == "failed"
    assert parse_state("slurm", "JobId=8 JobState=COMPLETED Reason=None\n", step=2) == "done"
    assert parse_state("slurm", "JobId=8 ArrayTaskId=0-3 JobState=PENDING\n", step=2) == "pending"
    assert parse_state("slurm", "", 1, step=2) == "unknown"  # purged after MinJobAge
    assert state_command("slurm", "7", 3) is None


def test_parse_state_others():
    running = "job_number:  5\nusage         1:            cpu=00:00:00, mem=0 GB s\n"
    assert parse_state("sge", running) == "running"
    assert parse_state("sge", "job_number:  5\nsubmission_time: x\n") == "pending"
    assert parse_state("sge", "Following jobs do not exist: \n5\n", 1) == "unknown"
    acct = "taskid 1\nfailed       0    \nexit_status  0\ntaskid 2\nfailed 0\nexit_status 0\n"
    assert parse_state("sge", acct, 0, step=1) == "done"
    assert (
        parse_state("sge", "failed 37  : qmaster enforced h_rt\nexit_status 0\n", 0, 1) == "failed"
    )
    assert parse_state("pbs", "Job Id: 1[].s\n    job_state = B\n") == "running"
    assert parse_state("pbs", "    job_state = Q\n") == "pending"
    assert parse_state("pbs", "    job_state = F\n    Exit_status = 0\n") == "done"
    assert parse_state("pbs", "    job_state = F\n    Exit_status = 271\n") == "failed"
    assert parse_state("lsf", "RUN\nPEND\nDONE\n") == "running"
    assert parse_state("lsf", "DONE\nEXIT\n") == "failed"
    assert parse_state("lsf", "DONE\nDONE\n") == "done"
    assert parse_state("htcondor", "1 undefined\n2 undefined\n") == "running"
    assert parse_state("htcondor", "") == "unknown"
    assert parse_state("htcondor", "4 0\n4 0\n", step=1) == "done"
    assert parse_state("htcondor", "4 0\n3 undefined\n", step=1) == "failed"


def test_poll_state_falls_back_to_accounting():
    calls = []

    def run(argv):
        calls.append(argv[0])
        if argv[0] == "squeue":
            return subprocess.CompletedProcess(argv, 1, "", "Invalid job id specified")
        return subprocess.CompletedProcess(argv, 0, "COMPLETED\nCOMPLETED\n", "")

    assert poll_state("slurm", "12", run) == "done"
    assert calls == ["squeue", "sacct"]

    def missing(argv):
        raise FileNotFoundError(argv[0])

    assert poll_state("lsf", "12", missing) == "unknown"


# ---------------------------------------------------------------- running the scripts for real
FAKE_PYTHON = """\
#!{python}
# Stands in for `python -m pipefarm worker ...` (the worker is written elsewhere): records
# argv, PIPEFARM_* env, the signal dispositions it inherited, and the signals it receives.
import json, os, signal, sys, time
out = os.environ["FAKE_OUT"]
tag = os.environ.get("PIPEFARM_ELEMENT", "x") + "." + os.environ.get("PIPEFARM_SLOT", "x")
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append("TERM"))
def dump(name, obj):
    tmp = os.path.join(out, name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, os.path.join(out, name))
dump("start." + tag, {{
    "argv": sys.argv[1:],
    "env": {{k: v for k, v in os.environ.items() if k.startswith("PIPEFARM_")}},
    "usr1_ignored": signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN,
    "usr2_ignored": signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN,
    "pid": os.getpid(),
}})
if os.environ.get("FAKE_MODE") == "wait":  # like a worker busy until it is told to stop
    deadline = time.time() + 30
    while not got and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # a repeated signal would show up here
dump("end." + tag, {{"signals": got}})
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""

ARRAY_VARS = ("SLURM_ARRAY_TASK_ID", "PBS_ARRAY_INDEX", "SGE_TASK_ID", "LSB_JOBINDEX")


@pytest.fixture
def fake(tmp_path):
    """(spec factory, output dir): specs whose python is the fake interpreter."""
    py = tmp_path / "fake-python"
    py.write_text(FAKE_PYTHON.format(python=sys.executable))
    py.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()

    def make(elements=8, **kw):
        return ArraySpec(str(tmp_path / "run"), elements, python=str(py), **kw)

    return make, out


def start(scheduler, spec, out, array_env, *, mode="exit", exit_code=0, tmp=None):
    """Write the files and start the element script as the scheduler would: bash SCRIPT."""
    path = write_scripts(scheduler, spec)
    env = {
        k: v for k, v in os.environ.items() if k not in ARRAY_VARS and not k.startswith("PIPEFARM_")
    }
    env.update(FAKE_OUT=str(out), FAKE_MODE=mode, FAKE_EXIT=str(exit_code))
    args = []
    if scheduler == "htcondor":
        args = [array_env.pop("PROCESS")]  # HTCondor passes $(Process) as the argument
        path = path.with_name(f"{spec.job_name}.htcondor.sh")
    env.update(array_env)
    return subprocess.Popen(
        ["bash", str(path), *args], env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def records(out: Path, kind: str) -> dict[str, dict]:
    return {
        p.name.split(".", 1)[1]: json.loads(p.read_text())
        for p in out.glob(kind + ".*")
        if not p.name.endswith(".tmp")
    }


def wait_for(out: Path, kind: str, n: int, timeout: float = 20.0) -> dict[str, dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = records(out, kind)
        if len(got) >= n:
            return got
        time.sleep(0.02)
    raise AssertionError(f"only {records(out, kind)} of {n} {kind} records")


# scheduler, the array variables as the scheduler sets them, the 0-based element they mean
CASES = [
    ("slurm", {"SLURM_ARRAY_TASK_ID": "1"}, 1),
    ("pbs", {"PBS_ARRAY_INDEX": "3"}, 3),
    ("sge", {"SGE_TASK_ID": "2"}, 1),
    ("lsf", {"LSB_JOBINDEX": "4"}, 3),
    ("htcondor", {"PROCESS": "5"}, 5),
]


@pytest.mark.parametrize("scheduler,array_env,element", CASES)
def test_script_starts_workers_with_the_element(fake, scheduler, array_env, element):
    make, out = fake
    spec = make(workers_per_element=2)
    p = start(scheduler, spec, out, dict(array_env))
    stdout, stderr = p.communicate(timeout=30)
    assert p.returncode == 0, stderr
    started = records(out, "start")
    assert sorted(started) == [f"{element}.0", f"{element}.1"]
    run_dir = os.path.abspath(spec.run_dir)
    for slot in (0, 1):
        rec = started[f"{element}.{slot}"]
        assert rec["argv"] == [
            "-m", "pipefarm", "worker", run_dir, "--element", str(element), "--signal", "TERM",
        ]  # fmt: skip
        assert rec["env"]["PIPEFARM_ELEMENT"] == str(element)
        assert rec["env"]["PIPEFARM_SLOT"] == str(slot)
        assert rec["env"]["PIPEFARM_ELEMENTS"] == "8"
        assert rec["env"]["PIPEFARM_SCHEDULER"] == scheduler
        assert rec["usr1_ignored"] and rec["usr2_ignored"]
    assert f"element {element} of 8" in stderr


@pytest.mark.parametrize("scheduler,array_env,element", CASES)
@pytest.mark.slow
def test_sigterm_to_the_script_reaches_every_worker(fake, scheduler, array_env, element):
    make, out = fake
    p = start(scheduler, make(workers_per_element=3), out, dict(array_env), mode="wait")
    wait_for(out, "start", 3)
    t0 = time.monotonic()
    os.kill(p.pid, signal.SIGTERM)  # only the script, as SLURM's --signal=B: does
    p.communicate(timeout=30)
    assert time.monotonic() - t0 < 10
    ended = records(out, "end")
    assert sorted(ended) == [f"{element}.{s}" for s in range(3)]
    assert all(r["signals"] == ["TERM"] for r in ended.values()), ended
    assert p.returncode == 0  # the script waited for the workers, whose status was 0


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGUSR2])
@pytest.mark.slow
def test_sge_warning_to_the_process_group_is_forwarded(fake, sig):
    """SGE sends s_rt's SIGUSR1 and -notify's SIGUSR2 to the job's whole process group."""
    make, out = fake
    p = start("sge", make(workers_per_element=2), out, {"SGE_TASK_ID": "1"}, mode="wait")
    wait_for(out, "start", 2)
    os.killpg(p.pid, sig)
    p.communicate(timeout=30)
    ended = records(out, "end")
    assert sorted(ended) == ["0.0", "0.1"]  # both survived the USR signal ...
    assert all(r["signals"] == ["TERM"] for r in ended.values())  # ... and heard TERM
    assert p.returncode == 0


@pytest.mark.parametrize("scheduler,array_env", [("pbs", {"PBS_ARRAY_INDEX": "0"}),
                                                 ("htcondor", {"PROCESS": "0"})])  # fmt: skip
@pytest.mark.slow
def test_self_timer_warns_before_walltime(fake, scheduler, array_env):
    """PBS and HTCondor have no warning directive: the script's own timer sends it."""
    make, out = fake
    spec = make(time="00:00:03", warn_seconds=1)
    t0 = time.monotonic()
    p = start(scheduler, spec, out, dict(array_env), mode="wait")
    p.communicate(timeout=30)
    took = time.monotonic() - t0
    assert records(out, "end")["0.0"]["signals"] == ["TERM"]
    assert 1.8 < took < 6, took


def test_timer_does_not_outlive_the_script(fake):
    make, out = fake
    spec = make(time="01:00:00")
    p = start("pbs", spec, out, {"PBS_ARRAY_INDEX": "2"})
    # communicate() returns only when every holder of the pipes (a stray timer) has exited
    p.communicate(timeout=20)
    assert p.returncode == 0


def test_single_element_and_exit_status(fake):
    make, out = fake
    for scheduler, env in [("slurm", {}), ("pbs", {}), ("lsf", {"LSB_JOBINDEX": "0"}),
                           ("sge", {"SGE_TASK_ID": "undefined"}), ("htcondor", {"PROCESS": "0"})]:  # fmt: skip
        for f in out.iterdir():
            f.unlink()
        p = start(scheduler, make(elements=1), out, dict(env), exit_code=3)
        p.communicate(timeout=30)
        assert p.returncode == 3, scheduler  # a failing worker fails the element
        assert sorted(records(out, "start")) == ["0.0"], scheduler


def test_bad_index_is_refused(fake):
    make, out = fake
    p = start("slurm", make(), out, {"SLURM_ARRAY_TASK_ID": "x1"})
    _, err = p.communicate(timeout=30)
    assert p.returncode == 2 and "bad array index" in err
    assert records(out, "start") == {}


# -------------------------------------------------------------------- srun / mpiexec launches
def test_launch_command_shapes(tmp_path):
    argv = launch_command("srun", 4, str(tmp_path), python="/py", cpus_per_worker=2)
    assert argv[:4] == ["srun", "--ntasks=4", "--kill-on-bad-exit=0", "--cpus-per-task=2"]
    assert argv[4:6] == ["bash", "-c"]
    argv = launch_command("mpiexec", 3, str(tmp_path), python="/py")
    assert argv[:3] == ["mpiexec", "-n", "3"]
    with pytest.raises(ValueError):
        launch_command("aprun", 3, str(tmp_path))


@pytest.mark.parametrize(
    "rank_env,element",
    [
        ({"SLURM_PROCID": "2"}, 2),
        ({"PMI_RANK": "1"}, 1),
        ({"OMPI_COMM_WORLD_RANK": "3"}, 3),
        ({}, 0),
    ],
)
def test_launch_command_worker_gets_its_rank(fake, rank_env, element):
    """Run what srun/mpiexec would start on each rank (everything after the launcher)."""
    make, out = fake
    spec = make()
    argv = launch_command("srun", 4, spec.run_dir, python=spec.python)
    inner = argv[argv.index("bash") :]
    env = {k: v for k, v in os.environ.items() if "RANK" not in k and k != "SLURM_PROCID"}
    env.update(rank_env, FAKE_OUT=str(out), PIPEFARM_SLOT="0")
    subprocess.run(inner, env=env, check=True, timeout=30)
    rec = records(out, "start")[f"{element}.0"]
    assert rec["argv"][-4:] == ["--element", str(element), "--signal", "TERM"]
    assert rec["argv"][3] == os.path.abspath(spec.run_dir)


# ----------------------------------------------------------------- real schedulers (optional)
def _run_on_real(scheduler: str, fake, mode: str) -> None:
    """Submit to the real scheduler; in "wait" mode also signal the job through it."""
    make, out = fake
    fake_env = f"FAKE_OUT={out},FAKE_MODE={mode}"
    # SLURM exports the submitter's environment by default, SGE does not: name it either way
    extra = [f"--export=ALL,{fake_env}"] if scheduler == "slurm" else [f"-v {fake_env}"]
    n = 3 if mode == "exit" else 1
    spec = make(elements=n, workers_per_element=2, time="00:05:00", extra=extra)
    job = S.submit(scheduler, write_scripts(scheduler, spec))
    assert poll_state(scheduler, job) in ("pending", "running", "done")
    if mode == "wait":
        wait_for(out, "start", 2, timeout=60)
        assert poll_state(scheduler, job) == "running"
        # SLURM: TERM to the batch shell only, as --signal=B:TERM@warn does at the warning;
        # SGE: qdel with -notify sends SIGUSR2 to the process group, SIGKILL `notify` s later
        cmd = (
            ["scancel", "--batch", "--signal=TERM", job] if scheduler == "slurm" else ["qdel", job]
        )
        subprocess.run(cmd, check=True, timeout=30, capture_output=True)
    got = wait_for(out, "end", 2 * n, timeout=60)
    assert sorted(got) == [f"{e}.{s}" for e in range(n) for s in range(2)]
    assert {r["argv"][5] for r in records(out, "start").values()} == {str(e) for e in range(n)}
    if mode == "wait":
        assert all(r["signals"] == ["TERM"] for r in got.values()), got
    deadline = time.time() + 60
    while (state := poll_state(scheduler, job)) in ("pending", "running"):
        assert time.time() < deadline, state
        time.sleep(0.5)
    if mode == "exit":
        assert state in ("done", "unknown")  # unknown: accounting not written yet


@pytest.mark.scheduler
@pytest.mark.parametrize("mode", ["exit", "wait"])
def test_real_slurm_array(fake, mode):
    if not slurm_up():
        service_absent("no SLURM here (see ../shared/ci/slurm-up.sh)")
    _run_on_real("slurm", fake, mode)


@pytest.mark.scheduler
@pytest.mark.parametrize("mode", ["exit", "wait"])
def test_real_sge_array(fake, mode, monkeypatch):
    for k, v in SGE_ENV.items():
        monkeypatch.setenv(k, os.environ.get(k, v))
    if not sge_up():
        service_absent("no Grid Engine here (see ../shared/ci/sge-up.sh)")
    _run_on_real("sge", fake, mode)


def test_module_import_is_light():
    code = textwrap.dedent(
        """
        import sys
        import pipefarm.backends.array, pipefarm.store.journal
        heavy = {"pyarrow", "rich", "cloudpickle", "psutil", "click"} & set(sys.modules)
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

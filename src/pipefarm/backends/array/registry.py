"""Schedulers by name, and the operations that take a scheduler's name.

``pipefarm array --scheduler NAME`` and the array backend name a scheduler; this module looks
the name up in :data:`SCHEDULER_CLASSES` and hands the work to that class (``base.py`` says
what each one does). Writing the files and running the submit and poll commands are common to
all schedulers and live here too.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from .base import JobState, Rendered, Scheduler, SubmitCommand
from .htcondor import HTCondor
from .lsf import Lsf
from .pbs import Pbs
from .sge import Sge
from .slurm import Slurm
from .spec import ArraySpec, abs_path, resolved_paths, walltime_seconds

#: Every scheduler, by the name users give it.
SCHEDULER_CLASSES: dict[str, type[Scheduler]] = {
    cls.name: cls for cls in (Slurm, Pbs, Sge, HTCondor, Lsf)
}
SCHEDULERS = tuple(SCHEDULER_CLASSES)
SchedulerName = Literal["slurm", "pbs", "sge", "htcondor", "lsf"]


def scheduler_class(scheduler: str) -> type[Scheduler]:
    """The class of the scheduler called ``scheduler``; ValueError for an unknown name."""
    try:
        return SCHEDULER_CLASSES[scheduler]
    except KeyError:
        raise ValueError(
            f"unknown scheduler {scheduler!r}; one of {', '.join(SCHEDULERS)}"
        ) from None


def get_scheduler(scheduler: str) -> Scheduler:
    """The scheduler called ``scheduler`` (an instance: the classes hold no state)."""
    return scheduler_class(scheduler)()


def time_seconds(t: str | int | None, scheduler: str | None = None) -> int | None:
    """Walltime in seconds from minutes (int or digits), ``HH:MM:SS`` or ``D-HH:MM:SS``.

    Two fields, ``A:B``, mean what ``scheduler`` makes of them (its ``two_field_time``):
    ``"2:00"`` is 2 minutes for SLURM and PBS, 2 hours for LSF. Without a scheduler (or for
    SGE and HTCondor) two fields are refused, since their meaning depends on the scheduler.
    """
    cls = SCHEDULER_CLASSES.get(scheduler) if scheduler is not None else None
    return walltime_seconds(t, scheduler, cls.two_field_time if cls is not None else None)


# ------------------------------------------------------------------------------- the submit files
def render(scheduler: str, spec: ArraySpec, directory: str | None = None) -> Rendered:
    """The submit file(s) for ``spec`` on ``scheduler`` (slurm, pbs, sge, htcondor, lsf).

    ``directory`` is where the files will be written (default ``RUN_DIR/array``); only
    HTCondor's submit description needs it, to name its wrapper script by absolute path.
    """
    return get_scheduler(scheduler).render(spec, directory)


def write_scripts(scheduler: str, spec: ArraySpec, directory: str | None = None) -> Path:
    """Render and write the files (private, 0700 directory) and make the log directory.

    Returns the path of the file to submit. ``directory`` defaults to ``RUN_DIR/array``.
    """
    run_dir, log_dir, _ = resolved_paths(spec)
    out = Path(abs_path(directory) if directory else os.path.join(run_dir, "array"))
    rendered = render(scheduler, spec, str(out))
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    Path(log_dir).mkdir(mode=0o700, parents=True, exist_ok=True)  # schedulers do not create it
    for fname, content in rendered.files.items():
        p = out / fname
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(content)
        tmp.chmod(0o700 if fname in rendered.executables or fname == rendered.submit else 0o600)
        os.replace(tmp, p)
    return out / rendered.submit


# ------------------------------------------------------------------------- the scheduler's commands
def submit_command(scheduler: str, script_path: str | os.PathLike[str]) -> SubmitCommand:
    """The command that submits ``script_path`` (LSF's ``bsub`` reads the script on stdin)."""
    return get_scheduler(scheduler).submit_command(script_path)


def parse_job_id(scheduler: str, stdout: str) -> str:
    """The job id in a submit command's output; raises ValueError when there is none."""
    return get_scheduler(scheduler).parse_job_id(stdout)


def cancel_command(scheduler: str, job_id: str) -> list[str]:
    """The command that cancels the whole array."""
    return get_scheduler(scheduler).cancel_command(job_id)


def state_command(scheduler: str, job_id: str, step: int = 0) -> list[str] | None:
    """The command to run for step ``step`` of polling a job; None when there are no more.

    Step 0 asks the queue; step 1 (where there is one) asks the accounting records, for jobs
    that have left the queue: SLURM ``sacct``, SGE ``qacct``, HTCondor ``condor_history``.
    SLURM has a step 2, ``scontrol show job``: the controller keeps an ended job for
    ``MinJobAge`` (300 s by default), which answers where no accounting is kept (``sacct``
    then fails). Try the next step when :func:`parse_state` says ``"unknown"``.
    """
    steps = get_scheduler(scheduler).state_commands(job_id)
    return steps[step] if 0 <= step < len(steps) else None


def parse_state(scheduler: str, stdout: str, returncode: int = 0, step: int = 0) -> JobState:
    """Map the output of :func:`state_command` (same ``step``) to one array-wide state.

    ``running`` when any element runs, else ``pending`` when any waits, else ``failed`` when
    any failed (timed out, was cancelled, ...), else ``done``. ``unknown`` when the command
    did not find the job: try the next step.
    """
    return get_scheduler(scheduler).parse_state(stdout, returncode, step)


Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def poll_state(scheduler: str, job_id: str, run: Runner | None = None) -> JobState:
    """Ask the scheduler how the array stands, trying each :func:`state_command` step."""
    run = run or _run
    step = 0
    while (argv := state_command(scheduler, job_id, step)) is not None:
        try:
            cp = run(argv)
        except (OSError, subprocess.TimeoutExpired):
            state: JobState = "unknown"
        else:
            state = parse_state(scheduler, cp.stdout, cp.returncode, step)
        if state != "unknown":
            return state
        step += 1
    return "unknown"


def submit(scheduler: str, script_path: str | os.PathLike[str], run: Runner | None = None) -> str:
    """Submit ``script_path`` and return the job id; raises RuntimeError when refused."""
    cmd = submit_command(scheduler, script_path)
    if run is not None and cmd.stdin is None:
        cp = run(cmd.argv)
    else:
        stdin = open(cmd.stdin) if cmd.stdin else None  # noqa: SIM115 - closed below
        try:
            cp = subprocess.run(
                cmd.argv, stdin=stdin, capture_output=True, text=True, timeout=120, check=False
            )
        finally:
            if stdin:
                stdin.close()
    if cp.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd.argv)} failed ({cp.returncode}): {cp.stderr.strip()}")
    return parse_job_id(scheduler, cp.stdout)

"""The array backend: pipefarm workers as a batch scheduler's job array, or launched with
``srun``/``mpiexec`` inside an allocation.

Supported: SLURM, PBS Pro (OpenPBS), (Son of / Univa) Grid Engine, HTCondor and IBM LSF.
Every array element runs ``workers_per_element`` copies of::

    {python} -m pipefarm worker RUN_DIR --element $PIPEFARM_ELEMENT --signal SIG

in the background, forwards warning signals to them as ``SIG`` and waits for all of them. The
element index is normalised to 0-based in ``PIPEFARM_ELEMENT`` (SGE and LSF count from 1).
Each worker also gets ``PIPEFARM_SLOT`` (0 .. workers_per_element-1, e.g. to pick its GPUs),
``PIPEFARM_ELEMENTS``, ``PIPEFARM_WORKERS_PER_ELEMENT`` and ``PIPEFARM_SCHEDULER``.

Before the workers start, the ``setup`` lines run in order (``module load``, ``source
activate``); a comment in the script says which Python starts the workers. Memory
(``mem``/``mem_per_worker``) is written in each scheduler's own syntax: SLURM ``--mem``, PBS Pro
``select=...:mem=``, SGE ``-l h_vmem=`` (per slot), HTCondor ``request_memory``, LSF
``-R "rusage[mem=]"``. Log paths with white space are double-quoted for SLURM, SGE and LSF (the
real ``sbatch`` and SGE ``qsub`` accept that) and refused for PBS and HTCondor. Each
scheduler's module says how it warns before the walltime.

The modules, from the bottom up::

    spec        ArraySpec: what to ask for; walltime, memory and signal parsing (imports
                no other module of the package)
    script      the shell every element runs: start the workers, forward signals, wait
    base        Scheduler: one class with hooks (directives, submit, poll, cancel, states)
    slurm, pbs, sge, htcondor, lsf
                one subclass per scheduler
    registry    scheduler names -> classes; write the files, submit, poll
    launchers   srun / mpiexec: workers inside an allocation, the other way to start them
    backend     ArrayBackend: export ready tasks, submit, wait, fold the journals
"""

from __future__ import annotations

from .backend import (
    GONE_POLLS,
    LEFT_STATES,
    ArrayBackend,
    HeartbeatWatch,
    counts_left,
    export,
    finish,
    launch,
    lease_of,
    recall,
    sync,
)
from .base import JobState, Rendered, Scheduler, SubmitCommand
from .launchers import LAUNCHERS, launch_command
from .registry import (
    SCHEDULER_CLASSES,
    SCHEDULERS,
    SchedulerName,
    cancel_command,
    get_scheduler,
    parse_job_id,
    parse_state,
    poll_state,
    render,
    scheduler_class,
    state_command,
    submit,
    submit_command,
    time_seconds,
    write_scripts,
)
from .spec import NODE_LOCAL, ArraySpec, check_python, mem_mib, signal_name

__all__ = [
    "GONE_POLLS", "LAUNCHERS", "LEFT_STATES", "NODE_LOCAL", "SCHEDULERS", "SCHEDULER_CLASSES",
    "ArrayBackend", "ArraySpec", "HeartbeatWatch", "JobState", "Rendered", "Scheduler",
    "SchedulerName", "SubmitCommand", "cancel_command", "check_python", "counts_left", "export",
    "finish", "get_scheduler", "launch", "launch_command", "lease_of", "mem_mib", "parse_job_id",
    "parse_state", "poll_state", "recall", "render", "scheduler_class", "signal_name",
    "state_command", "submit", "submit_command", "sync", "time_seconds", "write_scripts",
]

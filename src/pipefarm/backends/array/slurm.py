"""SLURM: ``sbatch --array``; polled with ``squeue``, then ``sacct``, then ``scontrol``.

The walltime warning is ``--signal=B:SIG@warn``: to the batch shell only, which forwards it to
the workers. ``--time A:B`` reads minutes:seconds.
"""

from __future__ import annotations

import os
import re

from .base import JobState, Scheduler, combine, hms, mem_units, output_lines
from .spec import ArraySpec

#: SLURM job states (``squeue -o %T``, ``sacct -o State``, ``scontrol``'s ``JobState=``).
STATES: dict[str, JobState] = {
    "PENDING": "pending",  # waiting for resources or priority
    "CONFIGURING": "pending",  # allocated, nodes still booting: no worker runs yet
    "REQUEUED": "pending",  # sent back to the queue, will start again
    "REQUEUE_HOLD": "pending",  # requeued and held: may be released
    "REQUEUE_FED": "pending",  # requeued by a federation sibling
    "RESV_DEL_HOLD": "pending",  # held because its reservation was deleted
    "RESIZING": "pending",  # changing size: not running workers of ours yet
    "SPECIAL_EXIT": "pending",  # requeued in a held state after a special exit code
    "RUNNING": "running",  # running
    "COMPLETING": "running",  # its processes are ending: workers may still journal
    "SIGNALING": "running",  # being signalled: workers still up
    "STAGE_OUT": "running",  # burst buffer stage-out after the run
    "SUSPENDED": "running",  # suspended: will resume, its leases still held
    "STOPPED": "running",  # SIGSTOPped: will resume
    "UPDATE_DB": "running",  # accounting being updated for it
    "POWER_UP_NODE": "running",  # waiting for a node to power up, already started
    "COMPLETED": "done",  # every process exited 0
    "FAILED": "failed",  # non-zero exit
    "CANCELLED": "failed",  # scancel (sacct says "CANCELLED by UID")
    "TIMEOUT": "failed",  # walltime reached
    "NODE_FAIL": "failed",  # a node died
    "PREEMPTED": "failed",  # preempted and not requeued
    "BOOT_FAIL": "failed",  # a node failed to boot
    "DEADLINE": "failed",  # --deadline passed
    "OUT_OF_MEMORY": "failed",  # killed by the memory limit
    "REVOKED": "failed",  # a federation sibling started it instead
}


def slurm_time(secs: int) -> str:
    """``--time`` value: ``HH:MM:SS``, or ``D-HH:MM:SS`` from a day on."""
    d, rem = divmod(secs, 86400)
    return f"{d}-{hms(rem)}" if d else hms(rem)


class Slurm(Scheduler):
    name = "slurm"
    prefix = "#SBATCH"
    two_field_time = "MM:SS"
    quotes_paths = True  # checked with the real sbatch
    element_index = 'PIPEFARM_ELEMENT="${SLURM_ARRAY_TASK_ID:-0}"'
    submit_argv = ("sbatch", "--parsable")
    cancel_argv = ("scancel",)

    def head(self, spec: ArraySpec, log_dir: str) -> list[str]:
        d = ["#!/bin/bash", f"#SBATCH --job-name={spec.job_name}"]
        if spec.elements > 1:
            throttle = f"%{spec.throttle}" if spec.throttle else ""
            d.append(f"#SBATCH --array=0-{spec.elements - 1}{throttle}")
            out = os.path.join(log_dir, "%x-%A_%a.out")
        else:
            out = os.path.join(log_dir, "%x-%j.out")
        d += ["#SBATCH --nodes=1", "#SBATCH --ntasks=1", f"#SBATCH --cpus-per-task={spec.cpus}"]
        if spec.gpus:
            d.append(f"#SBATCH --gres=gpu:{spec.gpus}")
        if spec.mem_mib:
            d.append(f"#SBATCH --mem={mem_units(spec.mem_mib)}")  # per node: one node per element
        if spec.seconds:
            d.append(f"#SBATCH --time={slurm_time(spec.seconds)}")
        if spec.partition:
            d.append(f"#SBATCH --partition={spec.partition}")
        if spec.account:
            d.append(f"#SBATCH --account={spec.account}")
        if spec.warn_seconds:
            # B: only the batch shell gets it (it forwards); SLURM caps the lead at 65535 s
            d.append(f"#SBATCH --signal=B:{spec.signal}@{min(spec.warn_seconds, 65535)}")
        d.append(f"#SBATCH --output={self.quoted(out)}")
        return d + self.extra(spec.extra)

    def match_job_id(self, text: str) -> re.Match[str] | None:
        # "123" or "123;cluster"
        return re.match(r"(\d+)(?:;\S+)?\s*$", text.splitlines()[-1] if text else "")

    def state_commands(self, job_id: str) -> list[list[str]]:
        # scontrol last: the controller keeps an ended job for MinJobAge (300 s by default),
        # which answers where no accounting is kept (sacct then fails)
        return [
            ["squeue", "-h", "-j", job_id, "-o", "%T"],
            ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
            ["scontrol", "-o", "show", "job", job_id],
        ]

    def parse_state(self, stdout: str, returncode: int, step: int) -> JobState:
        if returncode != 0:
            return "unknown"  # "Invalid job id specified": gone from the queue
        if step == 2:  # scontrol -o: one record per line, "... JobState=COMPLETED Reason=..."
            return combine([STATES.get(m, "unknown")
                            for m in re.findall(r"\bJobState=(\S+)", stdout)])
        # sacct says "CANCELLED by 0"; squeue may say "PENDING"
        return combine([STATES.get(ln.split()[0], "unknown") for ln in output_lines(stdout)])

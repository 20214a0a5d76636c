"""(Son of / Univa) Grid Engine: ``qsub -t``; polled with ``qstat -j``, then ``qacct -j``.

The walltime warning: ``-l s_rt=time-warn`` makes the execd send SIGUSR1 at the soft limit, and
``-notify`` makes it send SIGUSR2 ``notify`` seconds (queue setting, default 60) before any
SIGKILL (the hard limit ``h_rt``, ``qdel``). Both go to the job's whole process group. SGE
counts array elements from 1 and has no two-field walltime.
"""

from __future__ import annotations

import os
import re

from .base import JobState, Scheduler, hms, mem_units, output_lines
from .spec import ArraySpec


class Sge(Scheduler):
    name = "sge"
    prefix = "#$"
    quotes_paths = True  # checked with the real qsub
    # SGE counts from 1 and says "undefined" outside an array
    element_index = (
        'case "${SGE_TASK_ID:-undefined}" in\n'
        '  undefined | "") PIPEFARM_ELEMENT=0 ;;\n'
        "  *) PIPEFARM_ELEMENT=$((SGE_TASK_ID - 1)) ;;\n"
        "esac"
    )
    submit_argv = ("qsub", "-terse")
    cancel_argv = ("qdel",)

    def head(self, spec: ArraySpec, log_dir: str) -> list[str]:
        # -t 1-1 is legal in SGE and keeps $TASK_ID defined, so even one element is an array
        d = ["#!/bin/bash", "#$ -S /bin/bash", f"#$ -N {spec.job_name}",
             f"#$ -t 1-{spec.elements}"]
        if spec.throttle and spec.elements > 1:
            d.append(f"#$ -tc {spec.throttle}")
        if spec.cpus > 1:
            d.append(f"#$ -pe {spec.parallel_env} {spec.cpus}")
        secs = spec.seconds
        if secs:
            d.append(f"#$ -l h_rt={hms(secs)}")
            if 0 < spec.warn_seconds < secs:
                # SIGUSR1 at the soft limit
                d.append(f"#$ -l s_rt={hms(secs - spec.warn_seconds)}")
        if spec.mem_mib:
            # h_vmem is per slot: SGE multiplies it by the -pe slots, so split the element's share
            slots = spec.cpus if spec.cpus > 1 else 1
            d.append(f"#$ -l h_vmem={mem_units(-(-spec.mem_mib // slots))}")
        if spec.gpus:
            d.append(f"#$ -l gpu={spec.gpus}")  # the usual name of the consumable; site-specific
        if spec.partition:
            d.append(f"#$ -q {spec.partition}")
        if spec.account:
            d.append(f"#$ -A {spec.account}")
        out = os.path.join(log_dir, spec.job_name + ".$JOB_ID.$TASK_ID.out")
        d += [
            "#$ -notify",  # SIGUSR2 `notify` seconds before SIGKILL (h_rt, qdel)
            "#$ -j y",
            f"#$ -o {self.quoted(out)}",
        ]
        return d + self.extra(spec.extra)

    def match_job_id(self, text: str) -> re.Match[str] | None:
        # "Your job-array 3.1-4:1 (...)", "Your job 5 (...)", -terse "3.1-4:1"
        return re.search(r"Your job(?:-array)? (\d+)", text) or re.match(r"(\d+)(?:\.\S*)?\s*$", text)

    def state_commands(self, job_id: str) -> list[list[str]]:
        return [["qstat", "-j", job_id], ["qacct", "-j", job_id]]

    def parse_state(self, stdout: str, returncode: int, step: int) -> JobState:
        if returncode != 0:
            return "unknown"  # qstat: "Following jobs do not exist"; qacct: not (yet) there
        lines = output_lines(stdout)
        if step == 0:
            # running tasks have "usage  N:" lines; queued ones do not
            return "running" if any(ln.startswith("usage") for ln in lines) else "pending"
        # qacct: each ended task's "failed" (0, or the code of why SGE failed it) and
        # "exit_status" (the script's); all zero is done, anything else failed
        fails = [ln.split()[1] for ln in lines if ln.startswith("failed")]
        codes = [ln.split()[1] for ln in lines if ln.startswith("exit_status")]
        if not fails and not codes:
            return "unknown"
        return "done" if all(x == "0" for x in fails + codes) else "failed"

"""IBM LSF: ``bsub -J "name[1-N]"`` (the script on stdin); polled with ``bjobs``.

The walltime warning is ``-wa SIG -wt minutes`` (the warning action before the run limit).
``-W A:B`` reads hours:minutes. LSF counts array elements from 1.
"""

from __future__ import annotations

import os
import re

from .base import JobState, Scheduler, SubmitCommand, combine, minutes_up, output_lines
from .spec import ArraySpec

#: LSF job states (``bjobs -o stat``).
STATES: dict[str, JobState] = {
    "PEND": "pending",  # waiting to be scheduled
    "PSUSP": "pending",  # suspended while pending (bstop): may be resumed
    "WAIT": "pending",  # a chunk-job member waiting to run
    "PROV": "pending",  # its hosts are being provisioned
    "RUN": "running",  # running
    "USUSP": "running",  # suspended by its owner while running: will resume
    "SSUSP": "running",  # suspended by LSF (load, a run window): will resume
    "DONE": "done",  # exited 0
    "EXIT": "failed",  # non-zero exit, killed or over a limit
}


def lsf_time(secs: int) -> str:
    """``-W`` value: ``H:MM``, minutes rounded up."""
    h, m = divmod(minutes_up(secs), 60)
    return f"{h}:{m:02d}"


class Lsf(Scheduler):
    name = "lsf"
    prefix = "#BSUB"
    two_field_time = "HH:MM"
    quotes_paths = True  # LSF documents quoting file names with spaces
    # LSF counts from 1 and sets 0 outside an array
    element_index = (
        'if [ "${LSB_JOBINDEX:-0}" -gt 0 ] 2>/dev/null; then\n'
        "  PIPEFARM_ELEMENT=$((LSB_JOBINDEX - 1))\n"
        "else\n"
        "  PIPEFARM_ELEMENT=0\n"
        "fi"
    )
    submit_argv = ("bsub",)
    cancel_argv = ("bkill",)

    def head(self, spec: ArraySpec, log_dir: str) -> list[str]:
        if spec.elements > 1:
            throttle = f"%{spec.throttle}" if spec.throttle else ""
            d = ["#!/bin/bash", f'#BSUB -J "{spec.job_name}[1-{spec.elements}]{throttle}"']
        else:
            d = ["#!/bin/bash", f"#BSUB -J {spec.job_name}"]
        d += [f"#BSUB -n {spec.cpus}", '#BSUB -R "span[hosts=1]"']
        if spec.gpus:
            d.append(f'#BSUB -gpu "num={spec.gpus}"')
        if spec.mem_mib:
            # with span[hosts=1] the reservation (per host unless the site reserves per task)
            # is the element's; the unit is explicit, whatever LSF_UNIT_FOR_LIMITS says
            d.append(f'#BSUB -R "rusage[mem={spec.mem_mib}MB]"')
        if spec.seconds:
            d.append(f"#BSUB -W {lsf_time(spec.seconds)}")
        if spec.partition:
            d.append(f"#BSUB -q {spec.partition}")
        if spec.account:
            d.append(f"#BSUB -P {spec.account}")
        if spec.warn_seconds:
            d += [f"#BSUB -wa {spec.signal}", f"#BSUB -wt {minutes_up(spec.warn_seconds)}"]
        out = os.path.join(log_dir, spec.job_name + ".%J.%I.out")
        d.append(f"#BSUB -o {self.quoted(out)}")
        return d + self.extra(spec.extra)

    def submit_command(self, script_path: str | os.PathLike[str]) -> SubmitCommand:
        # bsub only reads #BSUB directives from a script given on stdin
        return SubmitCommand(list(self.submit_argv), stdin=os.fspath(script_path))

    def match_job_id(self, text: str) -> re.Match[str] | None:
        # "Job <1234> is submitted to queue <normal>."
        return re.search(r"Job <(\d+)>", text)

    def state_commands(self, job_id: str) -> list[list[str]]:
        return [["bjobs", "-noheader", "-o", "stat", job_id]]

    def parse_state(self, stdout: str, returncode: int, step: int) -> JobState:
        # no returncode check: bjobs says "Job <N> is not found" and the line maps to unknown
        return combine([STATES.get(ln.split()[0], "unknown") for ln in output_lines(stdout)])

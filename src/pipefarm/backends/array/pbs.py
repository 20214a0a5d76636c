"""PBS Pro (OpenPBS): ``qsub -J``; polled with ``qstat -x -f``.

PBS has no walltime-warning directive: the script arms its own timer. ``walltime=A:B`` reads
minutes:seconds. A path with white space cannot be a directive value (refused).
"""

from __future__ import annotations

import re

from .base import JobState, Scheduler, hms, mem_units, output_lines
from .spec import ArraySpec

#: PBS Pro ``job_state`` codes (``F`` and ``X``, finished, are judged by ``Exit_status``).
STATES: dict[str, JobState] = {
    "Q": "pending",  # queued
    "H": "pending",  # held
    "W": "pending",  # waiting for its start time
    "T": "pending",  # being moved to a new location
    "M": "pending",  # moved to another server
    "R": "running",  # running
    "B": "running",  # an array with at least one subjob started
    "E": "running",  # exiting after having run: workers may still journal
    "S": "running",  # suspended: will resume
    "U": "running",  # suspended because the workstation is busy
}


class Pbs(Scheduler):
    name = "pbs"
    prefix = "#PBS"
    two_field_time = "MM:SS"
    has_warning_directive = False
    element_index = 'PIPEFARM_ELEMENT="${PBS_ARRAY_INDEX:-0}"'
    submit_argv = ("qsub",)
    cancel_argv = ("qdel",)

    def head(self, spec: ArraySpec, log_dir: str) -> list[str]:
        d = ["#!/bin/bash", f"#PBS -N {spec.job_name}"]
        if spec.elements > 1:  # PBS Pro refuses a -J range with fewer than 2 indices
            throttle = f"%{spec.throttle}" if spec.throttle else ""  # max_run_subjobs
            d.append(f"#PBS -J 0-{spec.elements - 1}{throttle}")
        select = f"1:ncpus={spec.cpus}" + (f":ngpus={spec.gpus}" if spec.gpus else "")
        if spec.mem_mib:
            # PBS Pro: mem is a host-level resource, asked for in the select chunk; a job-wide
            # `-l mem=` beside `-l select` is the old syntax, which PBS Pro refuses to mix
            select += f":mem={mem_units(spec.mem_mib, ('mb', 'gb'))}"
        d.append(f"#PBS -l select={select}")
        if spec.seconds:
            d.append(f"#PBS -l walltime={hms(spec.seconds)}")
        if spec.partition:
            d.append(f"#PBS -q {spec.partition}")
        if spec.account:
            d.append(f"#PBS -A {spec.account}")
        # -o a directory: each (sub)job writes <jobid>.OU there; -j oe joins stderr into it
        d += ["#PBS -S /bin/bash", "#PBS -j oe", f"#PBS -o {self.quoted(log_dir)}"]
        return d + self.extra(spec.extra)

    def match_job_id(self, text: str) -> re.Match[str] | None:
        # "1234[].server" (array) or "1234.server"
        return re.match(r"(\d+(?:\[\])?(?:\.\S+)?)\s*$", text.splitlines()[-1] if text else "")

    def state_commands(self, job_id: str) -> list[list[str]]:
        return [["qstat", "-x", "-f", job_id]]  # -x: finished jobs too

    def parse_state(self, stdout: str, returncode: int, step: int) -> JobState:
        if returncode != 0:
            return "unknown"
        fields: dict[str, str] = {}
        for ln in output_lines(stdout):  # "    job_state = R"
            key, eq, value = ln.partition("=")
            if eq:
                fields.setdefault(key.strip(), value.strip())
        st = fields.get("job_state")
        if st in ("F", "X"):  # finished (F), or an array's finished subjob (X)
            code = fields.get("Exit_status", "0")
            return "done" if code == "0" else "failed"
        return STATES.get(st or "", "unknown")

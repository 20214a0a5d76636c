"""HTCondor: a submit description that queues N copies of a wrapper script; polled with
``condor_q``, then ``condor_history``.

HTCondor has no walltime-warning directive (the wrapper arms its own timer), no queues, no
two-field walltime, and a submit description cannot take a path with white space (refused).
The wrapper gets ``$(Process)`` (0-based) as its first argument.
"""

from __future__ import annotations

import os
import re

from .base import JobState, Rendered, Scheduler, combine, output_lines
from .spec import ArraySpec, abs_path, resolved_paths

#: HTCondor ``JobStatus`` codes (4, completed, is judged by ``ExitCode``).
STATES: dict[str, JobState] = {
    "1": "pending",  # idle
    "5": "pending",  # held
    "2": "running",  # running
    "6": "running",  # transferring output
    "7": "running",  # suspended
    "3": "failed",  # removed (condor_rm, periodic_remove at the walltime)
}


class HTCondor(Scheduler):
    name = "htcondor"
    prefix = ""  # every extra line is a submit command, verbatim
    has_warning_directive = False
    # HTCondor passes $(Process) (already 0-based) as the first argument
    element_index = 'PIPEFARM_ELEMENT="${1:-0}"'
    submit_argv = ("condor_submit",)
    cancel_argv = ("condor_rm",)

    def render(self, spec: ArraySpec, directory: str | None = None) -> Rendered:
        """A submit description and the wrapper script it names by absolute path (in
        ``directory``, default ``RUN_DIR/array``)."""
        run_dir, log_dir, _ = resolved_paths(spec)
        name = spec.job_name
        directory = abs_path(directory) if directory else os.path.join(run_dir, "array")
        wrapper = f"{name}.htcondor.sh"
        sub = f"{name}.htcondor.sub"
        script = "\n".join(self.head(spec, log_dir)) + "\n" + self.body(spec)
        return Rendered(
            self.name,
            submit=sub,
            files={
                sub: self.submit_description(spec, os.path.join(directory, wrapper), log_dir),
                wrapper: script,
            },
            executables=[wrapper],
        )

    def head(self, spec: ArraySpec, log_dir: str) -> list[str]:
        """The wrapper script's first lines (the directives live in the ``.sub`` file)."""
        return ["#!/bin/bash", "# HTCondor wrapper: $1 is the element ($(Process))"]

    def submit_description(self, spec: ArraySpec, wrapper: str, log_dir: str) -> str:
        """The ``.sub`` file: ``spec.elements`` copies of ``wrapper``."""
        base = self.quoted(os.path.join(log_dir, spec.job_name))
        wrapper = self.quoted(wrapper)
        d = [
            "# pipefarm array: HTCondor submit description (generated)",
            "universe = vanilla",
            f"batch_name = {spec.job_name}",
            f"executable = {wrapper}",
            "transfer_executable = False",
            "should_transfer_files = NO",  # workers share the run directory's filesystem
            "arguments = $(Process)",
            f"output = {base}.$(Cluster).$(Process).out",
            f"error = {base}.$(Cluster).$(Process).err",
            f"log = {base}.$(Cluster).log",
            f"request_cpus = {spec.cpus}",
        ]
        if spec.mem_mib:
            d.append(f"request_memory = {spec.mem_mib}")  # MiB
        if spec.gpus:
            d.append(f"request_gpus = {spec.gpus}")
        secs = spec.seconds
        if secs:
            # +MaxRuntime is the convention many pools enforce; periodic_remove works everywhere
            d += [
                f"+MaxRuntime = {secs}",
                "periodic_remove = (JobStatus == 2) && ((time() - EnteredCurrentStatus) > "
                f"{secs})",
            ]
        d.append(f"kill_sig = SIG{spec.signal}")
        if spec.account:
            d.append(f"accounting_group = {spec.account}")
        if spec.partition:
            d.append(f"# partition {spec.partition!r} ignored: HTCondor has no queues")
        if spec.throttle and spec.elements > 1:
            d.append(f"max_materialize = {spec.throttle}")
        d += list(spec.extra)
        d.append(f"queue {spec.elements}")
        return "\n".join(d) + "\n"

    def match_job_id(self, text: str) -> re.Match[str] | None:
        # "4 job(s) submitted to cluster 17." or -terse "17.0 - 17.3"
        return re.search(r"submitted to cluster (\d+)", text) or re.match(r"(\d+)\.\d+", text)

    def state_commands(self, job_id: str) -> list[list[str]]:
        return [
            ["condor_q", job_id, "-af", "JobStatus", "ExitCode"],
            ["condor_history", job_id, "-af", "JobStatus", "ExitCode"],
        ]

    def parse_state(self, stdout: str, returncode: int, step: int) -> JobState:
        if returncode != 0:
            return "unknown"
        states: list[str] = []
        for ln in output_lines(stdout):
            parts = ln.split()
            status, code = parts[0], parts[1] if len(parts) > 1 else "undefined"
            if status == "4":  # completed: by its exit code
                states.append("done" if code in ("0", "undefined") else "failed")
            else:
                states.append(STATES.get(status, "unknown"))
        return combine(states)

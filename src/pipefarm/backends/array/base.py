"""The common shape of a batch scheduler: one class with hooks, one subclass per scheduler.

A :class:`Scheduler` knows how to ask its scheduler for an array of pipefarm workers and how to
follow it::

    ArraySpec ──head()──> directives ─┐
              ──script_body()─────────┴─> render() ──> files ──submit_command()──> job id
    job id ──state_commands()[step]──> stdout ──parse_state()──> pending/running/done/failed
    job id ──cancel_command()

A subclass (``slurm.py``, ``pbs.py``, ``sge.py``, ``htcondor.py``, ``lsf.py``) fills in its
directives (:meth:`Scheduler.head`), the shell line that reads its array index, its commands,
the id in its submit output and its state codes. The registry (``registry.py``) maps names to
subclasses.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, Literal

import msgspec

from .script import script_body, self_timer
from .spec import ArraySpec, resolved_paths

JobState = Literal["pending", "running", "done", "failed", "unknown"]


class Rendered(msgspec.Struct):
    """Generated files: ``files`` maps file name to content; ``submit`` names the one to submit.

    ``executables`` lists the files that need the executable bit (HTCondor's wrapper).
    """

    scheduler: str
    submit: str
    files: dict[str, str]
    executables: list[str] = []


class SubmitCommand(msgspec.Struct):
    """How to submit a script: run ``argv``; if ``stdin`` is set, feed that file on stdin."""

    argv: list[str]
    stdin: str | None = None


class Scheduler(ABC):
    """One batch scheduler: its directives, commands and state codes.

    Subclasses set the class attributes and implement the four abstract hooks (:meth:`head`,
    :meth:`match_job_id`, :meth:`state_commands`, :meth:`parse_state`); the rest is common.
    """

    #: the name users give (``pipefarm array --scheduler NAME``)
    name: ClassVar[str]
    #: what starts a directive line in the script (``#SBATCH``)
    prefix: ClassVar[str]
    #: how a walltime ``A:B`` reads (``"MM:SS"``, ``"HH:MM"``); None: refused, as ambiguous
    two_field_time: ClassVar[str | None] = None
    #: whether a directive takes a double-quoted path (else a path with white space is refused
    #: rather than written as a directive the scheduler may split)
    quotes_paths: ClassVar[bool] = False
    #: whether the scheduler can warn before the walltime; if not, the script arms a timer
    has_warning_directive: ClassVar[bool] = True
    #: shell that sets ``PIPEFARM_ELEMENT`` (0-based) from the scheduler's array index
    element_index: ClassVar[str]
    #: the submit command, before the script's path
    submit_argv: ClassVar[tuple[str, ...]]
    #: the command that cancels a whole array, before the job id
    cancel_argv: ClassVar[tuple[str, ...]]

    # -- the submit script ---------------------------------------------------------------------
    @abstractmethod
    def head(self, spec: ArraySpec, log_dir: str) -> list[str]:
        """The script's first lines: ``#!`` and the directives."""

    def body(self, spec: ArraySpec) -> str:
        """The shell that starts the element's workers (:mod:`.script`)."""
        timer = None if self.has_warning_directive else self_timer(spec)
        return script_body(self.name, self.element_index, spec, timer)

    def render(self, spec: ArraySpec, directory: str | None = None) -> Rendered:
        """The submit file(s) for ``spec``: one script, ``JOB_NAME.SCHEDULER.sh``.

        ``directory`` is where the files will be written; only a scheduler whose submit file
        names another file (HTCondor) needs it.
        """
        _, log_dir, _ = resolved_paths(spec)
        fname = f"{spec.job_name}.{self.name}.sh"
        return Rendered(
            self.name,
            submit=fname,
            files={fname: "\n".join(self.head(spec, log_dir)) + "\n" + self.body(spec)},
        )

    def quoted(self, path: str) -> str:
        """``path`` as a directive's value: double-quoted when it holds white space."""
        if not any(c.isspace() for c in path):
            return path
        if not self.quotes_paths:
            raise ValueError(
                f"{path!r} holds white space, which {self.name} directives cannot take; use a "
                "run directory (or log directory) without spaces"
            )
        if '"' in path:
            raise ValueError(f"{path!r}: a path with both spaces and '\"' cannot be a directive")
        return f'"{path}"'

    def extra(self, lines: Sequence[str]) -> list[str]:
        """``spec.extra`` as directives: comment lines verbatim, others after the prefix."""
        return [ln if ln.lstrip().startswith("#") else f"{self.prefix} {ln}" for ln in lines]

    # -- submission -----------------------------------------------------------------------------
    def submit_command(self, script_path: str | os.PathLike[str]) -> SubmitCommand:
        """The command that submits ``script_path``."""
        return SubmitCommand([*self.submit_argv, os.fspath(script_path)])

    @abstractmethod
    def match_job_id(self, text: str) -> re.Match[str] | None:
        """The job id (group 1) in the submit command's stripped output."""

    def parse_job_id(self, stdout: str) -> str:
        """The job id in a submit command's output; raises ValueError when there is none."""
        m = self.match_job_id(stdout.strip())
        if not m:
            raise ValueError(f"no {self.name} job id in {stdout!r}")
        return m.group(1)

    def cancel_command(self, job_id: str) -> list[str]:
        """The command that cancels the whole array."""
        return [*self.cancel_argv, job_id]

    # -- polling --------------------------------------------------------------------------------
    @abstractmethod
    def state_commands(self, job_id: str) -> list[list[str]]:
        """The commands that ask how ``job_id`` stands, in order: the queue first, then (where
        there is one) the accounting records, for jobs that have left the queue."""

    @abstractmethod
    def parse_state(self, stdout: str, returncode: int, step: int) -> JobState:
        """Map the output of ``state_commands(job)[step]`` to one array-wide state;
        ``unknown`` when the command did not find the job (try the next step)."""


# ------------------------------------------------------------------- helpers for the subclasses
def combine(states: list[str]) -> JobState:
    """One state for an array from its elements' states.

    ``running`` when any element runs, else ``pending`` when any waits, else ``failed`` when
    any failed, else ``done``; ``unknown`` when no element is known.
    """
    known = [s for s in states if s != "unknown"]
    if not known:
        return "unknown"
    for s in ("running", "pending"):
        if s in known:
            return s  # type: ignore[return-value]
    return "failed" if "failed" in known else "done"


def output_lines(stdout: str) -> list[str]:
    """The non-blank lines of a command's output, stripped."""
    return [ln.strip() for ln in stdout.splitlines() if ln.strip()]


def hms(secs: int) -> str:
    """``HH:MM:SS`` (hours may pass 24)."""
    h, rem = divmod(secs, 3600)
    return f"{h:02d}:{rem // 60:02d}:{rem % 60:02d}"


def minutes_up(secs: int) -> int:
    """Whole minutes, rounded up, at least 1."""
    return max(1, -(-secs // 60))


def mem_units(mib: int, units: tuple[str, str] = ("M", "G")) -> str:
    """``4096`` -> ``4G``, ``4500`` -> ``4500M`` (whole GiB when exact: easier to read)."""
    return f"{mib // 1024}{units[1]}" if mib % 1024 == 0 else f"{mib}{units[0]}"

"""What an array asks for (:class:`ArraySpec`) and the parsing of its values.

Walltimes, memory sizes and signal names arrive as the user wrote them (``--time 2:00``,
``--mem 4G``, ``--signal usr1``); this module turns them into numbers and names once, at
submission time, so that a bad value fails here rather than in a script on a compute node. It
knows no scheduler's syntax: the scheduler modules write these values in their own.
"""

from __future__ import annotations

import os
import re
import signal as _signal
import sys

import msgspec

from ...execute.memory import MIB, parse_memory

_JOB_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,62}")


class ArraySpec(msgspec.Struct):
    """What to ask the scheduler for: one array of ``elements`` jobs of pipefarm workers.

    ``time`` is the walltime per element: minutes (an int or a string of digits),
    ``"HH:MM:SS"`` or ``"D-HH:MM:SS"``. ``partition`` is SLURM's partition and the queue of
    PBS, SGE and LSF (HTCondor has none). ``account`` is SLURM ``--account``, PBS/SGE ``-A``,
    LSF ``-P`` and HTCondor ``accounting_group``. CPUs and GPUs are per worker; an element asks
    for ``workers_per_element`` times as many, on one node. ``throttle`` caps how many elements
    run at once. ``extra`` lines are inserted after the generated directives: a line that
    starts with ``#`` goes in verbatim, any other line gets the scheduler's directive prefix
    (``#SBATCH`` ...); for HTCondor every line is a submit command, verbatim. ``log_dir``
    defaults to ``RUN_DIR/logs``. ``parallel_env`` is the SGE parallel environment used when
    an element needs more than one slot.

    ``setup`` lines run in order, in the element's shell, before any worker starts (``module
    load ...``, ``source .../activate``); the element stops with status 1 when one fails.
    ``python`` starts the workers: a path (made absolute) or a bare name such as ``python3``,
    looked up on the element's ``PATH`` *after* the setup lines ran.

    ``mem`` is the memory of one element, ``mem_per_worker`` that of one worker (at most one
    of them): a size such as ``4G``, ``500M``, ``1.5T`` or a bare number of MiB (units are
    binary: 1G = 1024M). See :func:`mem_mib`.
    """

    run_dir: str
    elements: int
    workers_per_element: int = 1
    time: str | int | None = None
    partition: str | None = None
    account: str | None = None
    cpus_per_worker: int = 1
    gpus_per_worker: int = 0
    throttle: int | None = None
    extra: list[str] = []
    job_name: str = "pipefarm"
    signal: str = "TERM"
    warn_seconds: int = 120
    python: str = msgspec.field(default_factory=lambda: sys.executable)
    log_dir: str | None = None
    parallel_env: str = "smp"
    setup: list[str] = []
    mem: str | None = None
    mem_per_worker: str | None = None

    def __post_init__(self) -> None:
        if self.elements < 1:
            raise ValueError("elements must be >= 1")
        if self.workers_per_element < 1:
            raise ValueError("workers_per_element must be >= 1")
        if self.cpus_per_worker < 1 or self.gpus_per_worker < 0:
            raise ValueError("cpus_per_worker must be >= 1 and gpus_per_worker >= 0")
        if self.throttle is not None and self.throttle < 1:
            raise ValueError("throttle must be >= 1 (or None for no limit)")
        if self.warn_seconds < 0:
            raise ValueError("warn_seconds must be >= 0")
        if not _JOB_NAME.fullmatch(self.job_name):
            raise ValueError(
                f"job_name {self.job_name!r}: use a letter then letters, digits, '_', '.', '-'"
            )
        self.signal = signal_name(self.signal)
        secs = walltime_seconds(self.time)  # validate now, not at render time
        if secs is not None and self.warn_seconds >= secs:
            # the warning would come before (or as) the element starts: workers would drain
            # at once and hand everything back, an array that never runs a task
            raise ValueError(
                f"the walltime warning ({self.warn_seconds} s before the end) is not shorter "
                f"than the walltime ({secs} s); lower --warn-seconds (0: no warning) or "
                "raise --time"
            )
        for line in self.extra:
            if "\n" in line or "\r" in line:
                raise ValueError(f"extra directive {line!r} spans lines")
        for line in self.setup:
            if "\n" in line or "\r" in line or not line.strip():
                raise ValueError(f"setup line {line!r}: give one non-empty line per --setup")
        if not re.fullmatch(r"[^\s\"'\\]+", self.parallel_env):
            raise ValueError(f"parallel environment {self.parallel_env!r}: one word, e.g. smp")
        if not self.python.strip() or any(c in self.python for c in "\n\r"):
            raise ValueError(f"python {self.python!r} is not a path or a command name")
        if self.mem is not None and self.mem_per_worker is not None:
            raise ValueError("give --mem (per element) or --mem-per-worker, not both")
        _ = self.mem_mib  # validate now, not at render time
        if not self.run_dir:
            raise ValueError("run_dir is empty")

    # -- derived values ----------------------------------------------------------------------
    @property
    def seconds(self) -> int | None:
        """The walltime in seconds, or None when not given."""
        return walltime_seconds(self.time)

    @property
    def cpus(self) -> int:
        """CPUs per element."""
        return self.cpus_per_worker * self.workers_per_element

    @property
    def gpus(self) -> int:
        """GPUs per element."""
        return self.gpus_per_worker * self.workers_per_element

    @property
    def mem_mib(self) -> int | None:
        """Memory per element in MiB, or None when not given."""
        if self.mem is not None:
            return mem_mib(self.mem)
        if self.mem_per_worker is not None:
            return mem_mib(self.mem_per_worker) * self.workers_per_element
        return None


# ------------------------------------------------------------------- parsing the spec's values
def signal_name(sig: str | int) -> str:
    """``"SIGTERM"``, ``"term"``, ``15`` -> ``"TERM"``; raises ValueError for unknown signals."""
    if isinstance(sig, int):
        try:
            return _signal.Signals(sig).name[3:]
        except ValueError:
            raise ValueError(f"unknown signal number {sig}") from None
    name = sig.strip().upper()
    name = name[3:] if name.startswith("SIG") else name
    if not hasattr(_signal, "SIG" + name) or name in ("KILL", "STOP"):
        raise ValueError(f"unusable warning signal {sig!r}")
    return name


def walltime_seconds(t: str | int | None, scheduler: str | None = None,
                     two_field: str | None = None) -> int | None:
    """Walltime in seconds from minutes (int or digits), ``HH:MM:SS`` or ``D-HH:MM:SS``.

    Two fields, ``A:B``, mean what ``scheduler`` makes of them: ``two_field`` says how it reads
    them (``"MM:SS"``, ``"HH:MM"``: a scheduler's ``two_field_time``, which ``time_seconds``
    in ``registry.py`` looks up by name). Without a scheduler, or one without a two-field
    form, two fields are refused, since their meaning depends on the scheduler.
    """
    if t is None:
        return None
    if isinstance(t, str) and scheduler is not None:
        m2 = re.fullmatch(r"(\d+):(\d{1,2})", t.strip())
        form = two_field
        if m2 and form:
            a, b = int(m2.group(1)), int(m2.group(2))
            if b >= 60:
                raise ValueError(f"bad walltime {t!r}: the second field of {form} must be < 60")
            secs = a * 60 + b if form == "MM:SS" else (a * 60 + b) * 60
            if secs <= 0:
                raise ValueError("walltime must be positive")
            return secs
    if isinstance(t, bool):
        raise ValueError(f"bad walltime {t!r}")
    if isinstance(t, int):
        if t <= 0:
            raise ValueError("walltime must be positive")
        return t * 60
    s = t.strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{1,2}):(\d{1,2})", s)
    if s.isdigit():
        secs = int(s) * 60
    elif m:
        d, h, mi, se = (int(x) if x else 0 for x in m.groups())
        if mi >= 60 or se >= 60:
            raise ValueError(f"bad walltime {t!r}: minutes and seconds must be < 60")
        secs = ((d * 24 + h) * 60 + mi) * 60 + se
    else:
        two = ""
        if scheduler is not None:
            form = two_field
            two = f", or {form}" if form else f" ({scheduler} has no two-field form)"
        raise ValueError(
            f"bad walltime {t!r}: give minutes, 'HH:MM:SS' or 'D-HH:MM:SS'{two}"
        )
    if secs <= 0:
        raise ValueError("walltime must be positive")
    return secs


def mem_mib(size: str | int) -> int:
    """A memory size in MiB, rounded up: ``"4G"``, ``"4GB"``, ``"4GiB"``, ``"500M"``,
    ``"1.5T"``, ``"512K"``; a bare number (an int too) is MiB (SLURM's ``--mem`` default
    unit). Units are binary (1G = 1024M), as SLURM, SGE (upper case) and HTCondor read them.
    ValueError for anything else, and for sizes under 1 MiB. The parser is the one task
    limits use (:func:`pipefarm.execute.memory.parse_memory`)."""
    if isinstance(size, bool):
        raise ValueError(f"bad memory size {size!r}")
    return -(-parse_memory(str(size)) // MIB)


#: Directories that are usually local to one node (a python there is missing on the others).
NODE_LOCAL = ("/tmp", "/var/tmp", "/dev/shm", "/scratch/local", "/local/scratch",
              "/localscratch", "/scratch_local", "/run/user")


def check_python(python: str) -> str | None:
    """Check the interpreter the workers will start with, at submission time.

    A path (anything with a ``/``) must exist and be executable here: ValueError when not. A
    bare name (``python3``) is looked up on the element's ``PATH`` after ``--setup`` and is
    not checked. Returns a one-line warning when the path lives under a node-local directory
    (:data:`NODE_LOCAL`, ``$TMPDIR``): the other nodes of the array will not have it.
    """
    if os.sep not in python:
        return None
    path = abs_path(python)
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        why = "does not exist" if not os.path.exists(path) else "is not an executable file"
        raise ValueError(f"the workers' python {path} {why}; choose one with --python")
    local = list(NODE_LOCAL)
    if os.environ.get("TMPDIR"):
        local.append(os.environ["TMPDIR"])
    for candidate in dict.fromkeys([path, os.path.realpath(path)]):
        for d in local:
            d = os.path.abspath(d)
            if candidate == d or candidate.startswith(d.rstrip(os.sep) + os.sep):
                return (
                    f"the workers' python {path} lives under {d}, which is usually local to "
                    "this node: the array's nodes may not have it (choose one with --python)"
                )
    return None


def abs_path(path: str) -> str:
    """``path`` made absolute, ``~`` expanded: the job does not start in the submit cwd."""
    return os.path.abspath(os.path.expanduser(path))


def resolved_paths(spec: ArraySpec) -> tuple[str, str, str]:
    """Absolute run dir, log dir and python (the job does not start in the submit cwd)."""
    run_dir = abs_path(spec.run_dir)
    log_dir = abs_path(spec.log_dir) if spec.log_dir else os.path.join(run_dir, "logs")
    python = abs_path(spec.python) if os.sep in spec.python else spec.python  # else: on PATH
    return run_dir, log_dir, python

"""Batch-scheduler job arrays of pipefarm workers: submit scripts, submission and polling.

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
real ``sbatch`` and SGE ``qsub`` accept that) and refused for PBS and HTCondor.

Walltime warning, per scheduler (``warn_seconds`` before the limit, signal ``spec.signal``):

* SLURM: ``--signal=B:SIG@warn`` (to the batch shell, which forwards it).
* SGE: ``-l s_rt=time-warn`` makes the execd send SIGUSR1 at the soft limit, and ``-notify``
  makes it send SIGUSR2 ``notify`` seconds (queue setting, default 60) before any SIGKILL (the
  hard limit ``h_rt``, ``qdel``). Both go to the job's whole process group.
* LSF: ``-wa SIG -wt minutes`` (the warning action before the run limit).
* PBS Pro and HTCondor have no warning directive: the script arms its own timer.

Signals that reach the script (TERM, INT, HUP, USR1, USR2 and ``spec.signal``) are forwarded
to every worker as ``spec.signal``. Workers inherit "ignore" for SIGUSR1/SIGUSR2 (and, as
background jobs of a non-interactive shell, SIGINT), so a scheduler that signals the whole process
group (SGE) cannot kill them with those; they hear the warning as ``spec.signal`` instead. The
worker turns each inherited "ignore" into a do-nothing handler at start-up
(:func:`pipefarm.worker.reset_inherited_signals`), so the tasks it runs start with default
dispositions and an empty signal mask. A worker may receive ``spec.signal`` twice (straight from
the scheduler and forwarded by the script).
"""

from __future__ import annotations

import math
import os
import re
import shlex
import signal as _signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import msgspec

SCHEDULERS = ("slurm", "pbs", "sge", "htcondor", "lsf")
Scheduler = Literal["slurm", "pbs", "sge", "htcondor", "lsf"]
JobState = Literal["pending", "running", "done", "failed", "unknown"]

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
        secs = time_seconds(self.time)  # validate now, not at render time
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
        return time_seconds(self.time)

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


# -------------------------------------------------------------------------------------- helpers
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


#: How each scheduler reads a walltime of two fields, ``A:B``: SLURM ``--time`` and PBS Pro
#: ``walltime`` read minutes:seconds, LSF ``-W`` hours:minutes; SGE's ``h_rt`` and HTCondor
#: have no two-field form (None: refused, give ``HH:MM:SS``).
TWO_FIELD_TIME: dict[str, str | None] = {
    "slurm": "MM:SS", "pbs": "MM:SS", "lsf": "HH:MM", "sge": None, "htcondor": None,
}


def time_seconds(t: str | int | None, scheduler: str | None = None) -> int | None:
    """Walltime in seconds from minutes (int or digits), ``HH:MM:SS`` or ``D-HH:MM:SS``.

    Two fields, ``A:B``, mean what ``scheduler`` makes of them (:data:`TWO_FIELD_TIME`):
    ``"2:00"`` is 2 minutes for SLURM and PBS, 2 hours for LSF. Without a scheduler (or for
    SGE and HTCondor) two fields are refused, since their meaning depends on the scheduler.
    """
    if t is None:
        return None
    if isinstance(t, str) and scheduler is not None:
        m2 = re.fullmatch(r"(\d+):(\d{1,2})", t.strip())
        form = TWO_FIELD_TIME.get(scheduler)
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
            form = TWO_FIELD_TIME.get(scheduler)
            two = f", or {form}" if form else f" ({scheduler} has no two-field form)"
        raise ValueError(
            f"bad walltime {t!r}: give minutes, 'HH:MM:SS' or 'D-HH:MM:SS'{two}"
        )
    if secs <= 0:
        raise ValueError("walltime must be positive")
    return secs


_MEM = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_MEM_SHIFT = {"k": -10, "": 0, "m": 0, "g": 10, "t": 20}  # powers of two relative to MiB


def mem_mib(size: str | int) -> int:
    """A memory size in MiB, rounded up: ``"4G"``, ``"4GB"``, ``"4GiB"``, ``"500M"``,
    ``"1.5T"``, ``"512K"``; a bare number is MiB (SLURM's ``--mem`` default unit). Units are
    binary (1G = 1024M), as SLURM, SGE (upper case) and HTCondor read them. ValueError for
    anything else, and for sizes under 1 MiB."""
    if isinstance(size, bool):
        raise ValueError(f"bad memory size {size!r}")
    m = _MEM.fullmatch(str(size).strip())
    if not m:
        raise ValueError(
            f"bad memory size {size!r}: give a number and a unit, e.g. 4G, 500M or 1.5T"
        )
    mib = float(m.group(1)) * 2.0 ** _MEM_SHIFT[m.group(2).lower()]
    if mib < 1:
        raise ValueError(f"memory size {size!r} is under 1 MiB")
    return math.ceil(mib)


def _mem_units(mib: int, units: tuple[str, str] = ("M", "G")) -> str:
    """``4096`` -> ``4G``, ``4500`` -> ``4500M`` (whole GiB when exact: easier to read)."""
    return f"{mib // 1024}{units[1]}" if mib % 1024 == 0 else f"{mib}{units[0]}"


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
    path = _abs(python)
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



def _hms(secs: int) -> str:
    h, rem = divmod(secs, 3600)
    return f"{h:02d}:{rem // 60:02d}:{rem % 60:02d}"


def _slurm_time(secs: int) -> str:
    d, rem = divmod(secs, 86400)
    return f"{d}-{_hms(rem)}" if d else _hms(rem)


def _minutes_up(secs: int) -> int:
    return max(1, -(-secs // 60))


def _lsf_time(secs: int) -> str:
    h, m = divmod(_minutes_up(secs), 60)
    return f"{h}:{m:02d}"


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _paths(spec: ArraySpec) -> tuple[str, str, str]:
    """Absolute run dir, log dir and python (the job does not start in the submit cwd)."""
    run_dir = _abs(spec.run_dir)
    log_dir = _abs(spec.log_dir) if spec.log_dir else os.path.join(run_dir, "logs")
    python = _abs(spec.python) if os.sep in spec.python else spec.python  # else: on PATH
    return run_dir, log_dir, python


#: Schedulers whose directive lines take a double-quoted path (checked: real sbatch and SGE
#: qsub; LSF documents quoting file names with spaces). PBS and HTCondor are not: a path with
#: white space is refused for them rather than written as a directive they may split.
_QUOTES_PATHS = ("slurm", "sge", "lsf")


def _quoted(scheduler: str, path: str) -> str:
    """``path`` as a directive's value: double-quoted when it holds white space."""
    if not any(c.isspace() for c in path):
        return path
    if scheduler not in _QUOTES_PATHS:
        raise ValueError(
            f"{path!r} holds white space, which {scheduler} directives cannot take; use a "
            "run directory (or log directory) without spaces"
        )
    if '"' in path:
        raise ValueError(f"{path!r}: a path with both spaces and '\"' cannot be a directive")
    return f'"{path}"'


def _extra(prefix: str, lines: Sequence[str]) -> list[str]:
    return [ln if ln.lstrip().startswith("#") else f"{prefix} {ln}" for ln in lines]


# ---------------------------------------------------------------------------- the script body
_INDEX = {
    "slurm": 'PIPEFARM_ELEMENT="${SLURM_ARRAY_TASK_ID:-0}"',
    "pbs": 'PIPEFARM_ELEMENT="${PBS_ARRAY_INDEX:-0}"',
    # SGE counts from 1 and says "undefined" outside an array
    "sge": 'case "${SGE_TASK_ID:-undefined}" in\n'
    '  undefined | "") PIPEFARM_ELEMENT=0 ;;\n'
    "  *) PIPEFARM_ELEMENT=$((SGE_TASK_ID - 1)) ;;\n"
    "esac",
    # LSF counts from 1 and sets 0 outside an array
    "lsf": 'if [ "${LSB_JOBINDEX:-0}" -gt 0 ] 2>/dev/null; then\n'
    "  PIPEFARM_ELEMENT=$((LSB_JOBINDEX - 1))\n"
    "else\n"
    "  PIPEFARM_ELEMENT=0\n"
    "fi",
    # HTCondor passes $(Process) (already 0-based) as the first argument
    "htcondor": 'PIPEFARM_ELEMENT="${1:-0}"',
}


def _body(scheduler: str, spec: ArraySpec, timer_after: int | None) -> str:
    """The shell that starts the workers, forwards signals and waits."""
    run_dir, _, python = _paths(spec)
    sig = spec.signal
    trapped = " ".join(dict.fromkeys(["TERM", "INT", "HUP", "USR1", "USR2", sig]))
    setup = ""
    if spec.setup:
        # before `set -u`: module and activate scripts read unset variables. Each line runs in
        # this shell (a { } group, so what it exports reaches the workers); a failing line
        # stops the element before any worker starts, rather than starting them half set up
        setup = "\n# ---- --setup lines, in order, before the workers start\n" + "".join(
            f"{{ {line}\n}} || {{ _pf_rc=$?; echo {shlex.quote(f'pipefarm: --setup line {i} failed')}"
            f'" (status $_pf_rc): "{shlex.quote(line)} >&2; exit 1; }}\n'
            for i, line in enumerate(spec.setup, 1)
        )
    if os.sep in python:
        which = f"# Python: {python} (pipefarm array --python; default: the interpreter that ran it)"
    else:
        which = (f"# Python: {python!r} as found on PATH after the --setup lines "
                 "(pipefarm array --python)")
    timer = ""
    if timer_after is not None:
        # no warning directive on this scheduler: a timer of our own sends the warning
        timer = f"""
# this scheduler has no walltime-warning directive: warn the workers ourselves
( trap 'kill "$_pf_sleep" 2>/dev/null; exit 0' TERM
  sleep {timer_after} & _pf_sleep=$!
  wait "$_pf_sleep" && kill -s {sig} $$ ) </dev/null >/dev/null 2>&1 &
_pf_timer=$!
"""
    return f"""
# ---- generated by pipefarm: start the workers of this array element -------------------------
{which}
{setup}
set -u
PIPEFARM_RUN_DIR={shlex.quote(run_dir)}
PIPEFARM_PYTHON={shlex.quote(python)}
{_INDEX[scheduler]}
case "$PIPEFARM_ELEMENT" in
  '' | *[!0-9]*) echo "pipefarm: bad array index '$PIPEFARM_ELEMENT'" >&2; exit 2 ;;
esac
export PIPEFARM_ELEMENT PIPEFARM_ELEMENTS={spec.elements} PIPEFARM_SCHEDULER={scheduler}
export PIPEFARM_WORKERS_PER_ELEMENT={spec.workers_per_element}
echo "pipefarm: element $PIPEFARM_ELEMENT of {spec.elements} on ${{HOSTNAME:-?}}," \\
  "{spec.workers_per_element} worker(s), run $PIPEFARM_RUN_DIR" >&2

_pf_pids=()
_pf_timer=
_pf_trapped=0
_pf_forward() {{
  _pf_trapped=1
  local p
  # ${{a[@]+...}}: an empty array is "unbound" to `set -u` in bash < 4.4
  for p in ${{_pf_pids[@]+"${{_pf_pids[@]}}"}}; do kill -s {sig} "$p" 2>/dev/null; done
}}
trap _pf_forward TERM INT HUP
# workers inherit "ignore" for USR1/USR2: SGE sends them to the whole process group
trap '' USR1 USR2
for ((_pf_slot = 0; _pf_slot < {spec.workers_per_element}; _pf_slot++)); do
  PIPEFARM_SLOT=$_pf_slot "$PIPEFARM_PYTHON" -m pipefarm worker "$PIPEFARM_RUN_DIR" \\
    --element "$PIPEFARM_ELEMENT" --signal {sig} &
  _pf_pids+=("$!")
done
trap _pf_forward {trapped}
{timer}
# wait for every worker; a trapped signal cuts `wait` short, so wait again until it really ended
_pf_status=0
for _pf_p in ${{_pf_pids[@]+"${{_pf_pids[@]}}"}}; do
  while :; do
    _pf_trapped=0
    wait "$_pf_p"
    _pf_rc=$?
    [ "$_pf_trapped" = 1 ] || break
  done
  [ "$_pf_rc" -ne 0 ] && [ "$_pf_status" -eq 0 ] && _pf_status=$_pf_rc
done
[ -n "$_pf_timer" ] && kill "$_pf_timer" 2>/dev/null
exit "$_pf_status"
"""


# ------------------------------------------------------------------------- per-scheduler heads
def _slurm(spec: ArraySpec, log_dir: str) -> list[str]:
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
        d.append(f"#SBATCH --mem={_mem_units(spec.mem_mib)}")  # per node: one node per element
    if spec.seconds:
        d.append(f"#SBATCH --time={_slurm_time(spec.seconds)}")
    if spec.partition:
        d.append(f"#SBATCH --partition={spec.partition}")
    if spec.account:
        d.append(f"#SBATCH --account={spec.account}")
    if spec.warn_seconds:
        # B: only the batch shell gets it (it forwards); SLURM caps the lead at 65535 s
        d.append(f"#SBATCH --signal=B:{spec.signal}@{min(spec.warn_seconds, 65535)}")
    d.append(f"#SBATCH --output={_quoted('slurm', out)}")
    return d + _extra("#SBATCH", spec.extra)


def _pbs(spec: ArraySpec, log_dir: str) -> list[str]:
    d = ["#!/bin/bash", f"#PBS -N {spec.job_name}"]
    if spec.elements > 1:  # PBS Pro refuses a -J range with fewer than 2 indices
        throttle = f"%{spec.throttle}" if spec.throttle else ""  # max_run_subjobs
        d.append(f"#PBS -J 0-{spec.elements - 1}{throttle}")
    select = f"1:ncpus={spec.cpus}" + (f":ngpus={spec.gpus}" if spec.gpus else "")
    if spec.mem_mib:
        # PBS Pro: mem is a host-level resource, asked for in the select chunk; a job-wide
        # `-l mem=` beside `-l select` is the old syntax, which PBS Pro refuses to mix
        select += f":mem={_mem_units(spec.mem_mib, ('mb', 'gb'))}"
    d.append(f"#PBS -l select={select}")
    if spec.seconds:
        d.append(f"#PBS -l walltime={_hms(spec.seconds)}")
    if spec.partition:
        d.append(f"#PBS -q {spec.partition}")
    if spec.account:
        d.append(f"#PBS -A {spec.account}")
    # -o a directory: each (sub)job writes <jobid>.OU there; -j oe joins stderr into it
    d += ["#PBS -S /bin/bash", "#PBS -j oe", f"#PBS -o {_quoted('pbs', log_dir)}"]
    return d + _extra("#PBS", spec.extra)


def _sge(spec: ArraySpec, log_dir: str) -> list[str]:
    # -t 1-1 is legal in SGE and keeps $TASK_ID defined, so even one element is an array
    d = ["#!/bin/bash", "#$ -S /bin/bash", f"#$ -N {spec.job_name}", f"#$ -t 1-{spec.elements}"]
    if spec.throttle and spec.elements > 1:
        d.append(f"#$ -tc {spec.throttle}")
    if spec.cpus > 1:
        d.append(f"#$ -pe {spec.parallel_env} {spec.cpus}")
    secs = spec.seconds
    if secs:
        d.append(f"#$ -l h_rt={_hms(secs)}")
        if 0 < spec.warn_seconds < secs:
            d.append(f"#$ -l s_rt={_hms(secs - spec.warn_seconds)}")  # SIGUSR1 at the soft limit
    if spec.mem_mib:
        # h_vmem is per slot: SGE multiplies it by the -pe slots, so split the element's share
        slots = spec.cpus if spec.cpus > 1 else 1
        d.append(f"#$ -l h_vmem={_mem_units(-(-spec.mem_mib // slots))}")
    if spec.gpus:
        d.append(f"#$ -l gpu={spec.gpus}")  # the usual name of the consumable; site-specific
    if spec.partition:
        d.append(f"#$ -q {spec.partition}")
    if spec.account:
        d.append(f"#$ -A {spec.account}")
    d += [
        "#$ -notify",  # SIGUSR2 `notify` seconds before SIGKILL (h_rt, qdel)
        "#$ -j y",
        f"#$ -o {_quoted('sge', os.path.join(log_dir, spec.job_name + '.$JOB_ID.$TASK_ID.out'))}",
    ]
    return d + _extra("#$", spec.extra)


def _lsf(spec: ArraySpec, log_dir: str) -> list[str]:
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
        d.append(f"#BSUB -W {_lsf_time(spec.seconds)}")
    if spec.partition:
        d.append(f"#BSUB -q {spec.partition}")
    if spec.account:
        d.append(f"#BSUB -P {spec.account}")
    if spec.warn_seconds:
        d += [f"#BSUB -wa {spec.signal}", f"#BSUB -wt {_minutes_up(spec.warn_seconds)}"]
    d.append(f"#BSUB -o {_quoted('lsf', os.path.join(log_dir, spec.job_name + '.%J.%I.out'))}")
    return d + _extra("#BSUB", spec.extra)


def _self_timer(spec: ArraySpec) -> int | None:
    secs = spec.seconds
    if secs and 0 < spec.warn_seconds < secs:
        return secs - spec.warn_seconds
    return None


def render(scheduler: str, spec: ArraySpec, directory: str | None = None) -> Rendered:
    """The submit file(s) for ``spec`` on ``scheduler`` (slurm, pbs, sge, htcondor, lsf).

    ``directory`` is where the files will be written (default ``RUN_DIR/array``); only
    HTCondor's submit description needs it, to name its wrapper script by absolute path.
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; one of {', '.join(SCHEDULERS)}")
    run_dir, log_dir, _ = _paths(spec)
    name = spec.job_name
    if scheduler == "htcondor":
        directory = _abs(directory) if directory else os.path.join(run_dir, "array")
        wrapper = f"{name}.htcondor.sh"
        sub = f"{name}.htcondor.sub"
        script = "#!/bin/bash\n# HTCondor wrapper: $1 is the element ($(Process))\n"
        script += _body("htcondor", spec, _self_timer(spec))
        return Rendered(
            scheduler,
            submit=sub,
            files={
                sub: _htcondor_submit(spec, os.path.join(directory, wrapper), log_dir),
                wrapper: script,
            },
            executables=[wrapper],
        )
    head = {"slurm": _slurm, "pbs": _pbs, "sge": _sge, "lsf": _lsf}[scheduler](spec, log_dir)
    timer = _self_timer(spec) if scheduler == "pbs" else None
    fname = f"{name}.{scheduler}.sh"
    return Rendered(
        scheduler,
        submit=fname,
        files={fname: "\n".join(head) + "\n" + _body(scheduler, spec, timer)},
    )


def _htcondor_submit(spec: ArraySpec, wrapper: str, log_dir: str) -> str:
    base = _quoted("htcondor", os.path.join(log_dir, spec.job_name))
    wrapper = _quoted("htcondor", wrapper)
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
            f"periodic_remove = (JobStatus == 2) && ((time() - EnteredCurrentStatus) > {secs})",
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


def write_scripts(scheduler: str, spec: ArraySpec, directory: str | None = None) -> Path:
    """Render and write the files (private, 0700 directory) and make the log directory.

    Returns the path of the file to submit. ``directory`` defaults to ``RUN_DIR/array``.
    """
    run_dir, log_dir, _ = _paths(spec)
    out = Path(_abs(directory) if directory else os.path.join(run_dir, "array"))
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


# --------------------------------------------------------------------- submission and polling
def submit_command(scheduler: str, script_path: str | os.PathLike[str]) -> SubmitCommand:
    """The command that submits ``script_path`` (LSF's ``bsub`` reads the script on stdin)."""
    path = os.fspath(script_path)
    if scheduler == "slurm":
        return SubmitCommand(["sbatch", "--parsable", path])
    if scheduler == "pbs":
        return SubmitCommand(["qsub", path])
    if scheduler == "sge":
        return SubmitCommand(["qsub", "-terse", path])
    if scheduler == "htcondor":
        return SubmitCommand(["condor_submit", path])
    if scheduler == "lsf":
        # bsub only reads #BSUB directives from a script given on stdin
        return SubmitCommand(["bsub"], stdin=path)
    raise ValueError(f"unknown scheduler {scheduler!r}")


def parse_job_id(scheduler: str, stdout: str) -> str:
    """The job id in a submit command's output; raises ValueError when there is none."""
    text = stdout.strip()
    m: re.Match[str] | None = None
    if scheduler == "slurm":  # "123" or "123;cluster"
        m = re.match(r"(\d+)(?:;\S+)?\s*$", text.splitlines()[-1] if text else "")
    elif scheduler == "pbs":  # "1234[].server" (array) or "1234.server"
        m = re.match(r"(\d+(?:\[\])?(?:\.\S+)?)\s*$", text.splitlines()[-1] if text else "")
    elif scheduler == "sge":  # "Your job-array 3.1-4:1 (...)", "Your job 5 (...)", -terse "3.1-4:1"
        m = re.search(r"Your job(?:-array)? (\d+)", text) or re.match(r"(\d+)(?:\.\S*)?\s*$", text)
    elif scheduler == "htcondor":  # "4 job(s) submitted to cluster 17." or -terse "17.0 - 17.3"
        m = re.search(r"submitted to cluster (\d+)", text) or re.match(r"(\d+)\.\d+", text)
    elif scheduler == "lsf":  # "Job <1234> is submitted to queue <normal>."
        m = re.search(r"Job <(\d+)>", text)
    else:
        raise ValueError(f"unknown scheduler {scheduler!r}")
    if not m:
        raise ValueError(f"no {scheduler} job id in {stdout!r}")
    return m.group(1)


def cancel_command(scheduler: str, job_id: str) -> list[str]:
    """The command that cancels the whole array."""
    argv = {
        "slurm": ["scancel"],
        "pbs": ["qdel"],
        "sge": ["qdel"],
        "htcondor": ["condor_rm"],
        "lsf": ["bkill"],
    }.get(scheduler)
    if argv is None:
        raise ValueError(f"unknown scheduler {scheduler!r}")
    return [*argv, job_id]


def state_command(scheduler: str, job_id: str, step: int = 0) -> list[str] | None:
    """The command to run for step ``step`` of polling a job; None when there are no more.

    Step 0 asks the queue; step 1 (where there is one) asks the accounting records, for jobs
    that have left the queue: SLURM ``sacct``, SGE ``qacct``, HTCondor ``condor_history``.
    SLURM has a step 2, ``scontrol show job``: the controller keeps an ended job for
    ``MinJobAge`` (300 s by default), which answers where no accounting is kept (``sacct``
    then fails). Try the next step when :func:`parse_state` says ``"unknown"``.
    """
    steps: dict[str, list[list[str]]] = {
        "slurm": [
            ["squeue", "-h", "-j", job_id, "-o", "%T"],
            ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
            ["scontrol", "-o", "show", "job", job_id],
        ],
        "sge": [["qstat", "-j", job_id], ["qacct", "-j", job_id]],
        "pbs": [["qstat", "-x", "-f", job_id]],
        "lsf": [["bjobs", "-noheader", "-o", "stat", job_id]],
        "htcondor": [
            ["condor_q", job_id, "-af", "JobStatus", "ExitCode"],
            ["condor_history", job_id, "-af", "JobStatus", "ExitCode"],
        ],
    }
    if scheduler not in steps:
        raise ValueError(f"unknown scheduler {scheduler!r}")
    s = steps[scheduler]
    return s[step] if 0 <= step < len(s) else None


_SLURM = {
    **dict.fromkeys(
        [
            "PENDING",
            "CONFIGURING",
            "REQUEUED",
            "REQUEUE_HOLD",
            "REQUEUE_FED",
            "RESV_DEL_HOLD",
            "RESIZING",
            "SPECIAL_EXIT",
        ],
        "pending",
    ),
    **dict.fromkeys(
        [
            "RUNNING",
            "COMPLETING",
            "SIGNALING",
            "STAGE_OUT",
            "SUSPENDED",
            "STOPPED",
            "UPDATE_DB",
            "POWER_UP_NODE",
        ],
        "running",
    ),
    "COMPLETED": "done",
    **dict.fromkeys(
        [
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "PREEMPTED",
            "BOOT_FAIL",
            "DEADLINE",
            "OUT_OF_MEMORY",
            "REVOKED",
        ],
        "failed",
    ),
}
_LSF = {
    "PEND": "pending",
    "PSUSP": "pending",
    "WAIT": "pending",
    "PROV": "pending",
    "RUN": "running",
    "USUSP": "running",
    "SSUSP": "running",
    "DONE": "done",
    "EXIT": "failed",
}
_PBS = {
    "Q": "pending",
    "H": "pending",
    "W": "pending",
    "T": "pending",
    "M": "pending",
    "R": "running",
    "B": "running",
    "E": "running",
    "S": "running",
    "U": "running",
}


def _combine(states: list[str]) -> JobState:
    """One state for an array from its elements' states."""
    known = [s for s in states if s != "unknown"]
    if not known:
        return "unknown"
    for s in ("running", "pending"):
        if s in known:
            return s  # type: ignore[return-value]
    return "failed" if "failed" in known else "done"


def parse_state(scheduler: str, stdout: str, returncode: int = 0, step: int = 0) -> JobState:
    """Map the output of :func:`state_command` (same ``step``) to one array-wide state.

    ``running`` when any element runs, else ``pending`` when any waits, else ``failed`` when
    any failed (timed out, was cancelled, ...), else ``done``. ``unknown`` when the command
    did not find the job: try the next step.
    """
    lines = [ln.strip() for ln in stdout.splitlines() if ln.strip()]
    if scheduler == "slurm":
        if returncode != 0:
            return "unknown"  # "Invalid job id specified": gone from the queue
        if step == 2:  # scontrol -o: one record per line, "... JobState=COMPLETED Reason=..."
            return _combine([_SLURM.get(m, "unknown")
                             for m in re.findall(r"\bJobState=(\S+)", stdout)])
        # sacct says "CANCELLED by 0"; squeue may say "PENDING"
        return _combine([_SLURM.get(ln.split()[0], "unknown") for ln in lines])
    if scheduler == "sge":
        if returncode != 0:
            return "unknown"  # qstat: "Following jobs do not exist"; qacct: not (yet) there
        if step == 0:
            # running tasks have "usage  N:" lines; queued ones do not
            return "running" if any(ln.startswith("usage") for ln in lines) else "pending"
        fails = [ln.split()[1] for ln in lines if ln.startswith("failed")]
        codes = [ln.split()[1] for ln in lines if ln.startswith("exit_status")]
        if not fails and not codes:
            return "unknown"
        return "done" if all(x == "0" for x in fails + codes) else "failed"
    if scheduler == "pbs":
        if returncode != 0:
            return "unknown"
        fields: dict[str, str] = {}
        for ln in lines:  # "    job_state = R"
            key, eq, value = ln.partition("=")
            if eq:
                fields.setdefault(key.strip(), value.strip())
        st = fields.get("job_state")
        if st in ("F", "X"):
            code = fields.get("Exit_status", "0")
            return "done" if code == "0" else "failed"
        return _PBS.get(st or "", "unknown")  # type: ignore[return-value]
    if scheduler == "lsf":
        return _combine([_LSF.get(ln.split()[0], "unknown") for ln in lines])
    if scheduler == "htcondor":
        if returncode != 0:
            return "unknown"
        states = []
        for ln in lines:
            parts = ln.split()
            status, code = parts[0], parts[1] if len(parts) > 1 else "undefined"
            states.append(
                {
                    "1": "pending",
                    "5": "pending",
                    "2": "running",
                    "6": "running",
                    "7": "running",
                    "3": "failed",
                }.get(status, "unknown")
            )
            if status == "4":
                states[-1] = "done" if code in ("0", "undefined") else "failed"
        return _combine(states)
    raise ValueError(f"unknown scheduler {scheduler!r}")


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


# --------------------------------------------------------------- workers inside an allocation
#: The rank each launcher gives its processes, first match wins.
_RANK = "${SLURM_PROCID:-${PMI_RANK:-${PMIX_RANK:-${OMPI_COMM_WORLD_RANK:-0}}}}"


def launch_command(
    launcher: str,
    n: int,
    run_dir: str,
    *,
    python: str | None = None,
    signal: str = "TERM",
    cpus_per_worker: int | None = None,
) -> list[str]:
    """argv that starts ``n`` workers with ``srun`` or ``mpiexec`` inside an allocation.

    Each process runs ``python -m pipefarm worker RUN_DIR --element RANK --signal SIG`` with
    its launcher rank as the element (``SLURM_PROCID``, ``PMI_RANK``, ``PMIX_RANK`` or
    ``OMPI_COMM_WORLD_RANK``), through a tiny ``bash -c`` that ``exec``\\ s the worker so
    signals reach it directly.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    sig = signal_name(signal)
    py = python or sys.executable
    inner = (
        f'PIPEFARM_ELEMENT="{_RANK}"; export PIPEFARM_ELEMENT PIPEFARM_ELEMENTS={n}; '
        f"exec {shlex.quote(py)} -m pipefarm worker {shlex.quote(_abs(run_dir))} "
        f'--element "$PIPEFARM_ELEMENT" --signal {sig}'
    )
    worker = ["bash", "-c", inner, "pipefarm-worker"]
    if launcher == "srun":
        argv = ["srun", f"--ntasks={n}", "--kill-on-bad-exit=0"]
        if cpus_per_worker:
            argv.append(f"--cpus-per-task={cpus_per_worker}")
        return argv + worker
    if launcher == "mpiexec":
        return ["mpiexec", "-n", str(n), *worker]
    raise ValueError(f"unknown launcher {launcher!r}; 'srun' or 'mpiexec'")

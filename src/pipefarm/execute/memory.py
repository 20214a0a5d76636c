"""Memory per task: sizes as users write them, the limit a task runs under, its peak.

Three pieces, used by the worker for every attempt:

* :func:`parse_memory` reads ``"4G"``-style sizes, for ``memory=`` in the Python API,
  ``pipefarm submit --mem`` and ``pipefarm array --mem`` alike.
* A Python task runs inside its worker process, so killing it would kill the worker. Instead
  :class:`DataLimit` lowers the process's soft ``RLIMIT_DATA`` to what it uses now plus the
  task's limit, for the task's duration only: an allocation past it fails and the task gets
  ``MemoryError`` (its attempt ends ``oom``) while the worker lives on.
* A command runs in its own process group: :class:`GroupWatch` sums the group's resident
  memory every :data:`WATCH_EVERY_S` and the group is killed once the sum passes the limit
  (pages its members share counted once).

Peak memory is resident memory (RSS), in bytes: for a Python attempt the worker process's
high-water mark while it ran (:class:`PeakMeter`), for a command the larger of its
``wait4`` ``ru_maxrss`` and the largest group use the watch saw. A command's ``ru_maxrss``
starts at its worker's resident memory when it started it (the kernel carries the mark across
``exec``), so a small command's peak is about its worker's size (tens of MiB).
"""

from __future__ import annotations

import math
import os
import re
import resource
from typing import Any

MIB = 1 << 20

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_SHIFT = {"k": 10, "": 20, "m": 20, "g": 30, "t": 40}  # a bare number is MiB


def parse_memory(size: str | int) -> int:
    """A memory size in bytes, at least 1 MiB.

    A string is a number and a binary unit: ``"4G"``, ``"4GB"``, ``"4GiB"``, ``"500M"``,
    ``"1.5T"``, ``"512K"``; a bare number in a string is MiB (SLURM's ``--mem`` default unit).
    An ``int`` is bytes. Raises :class:`ValueError` with a one-line reason for anything else.
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"bad memory size {size!r}: give bytes (an int) or a size such as '4G'")
    if isinstance(size, int):
        n = size
    else:
        m = _SIZE.fullmatch(size.strip())
        if not m:
            raise ValueError(
                f"bad memory size {size!r}: give a number and a unit, e.g. 4G, 500M or 1.5T"
            )
        n = math.ceil(float(m.group(1)) * (1 << _SHIFT[m.group(2).lower()]))
    if n < MIB:
        hint = " (an int is bytes: write e.g. '4G')" if isinstance(size, int) else ""
        raise ValueError(f"memory size {size!r} is under 1 MiB{hint}")
    return n


def format_memory(n: int) -> str:
    """``4294967296`` -> ``"4.0 GiB"``: a size for messages."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


# --- Python tasks: a data limit for the task's duration --------------------------------------------
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _data_in_use() -> int | None:
    """Bytes of this process's data segment and private mappings (what RLIMIT_DATA counts,
    plus the main stack), or None where /proc is missing."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[5]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


_mallinfo2: Any = None


def _heap_free() -> int:
    """Bytes free inside the C heap (glibc ``mallinfo2().fordblks``; 0 elsewhere).

    They count as data in use, yet a task can fill them without asking for more: after an
    attempt stopped at its limit, glibc keeps the regions it mapped when ``brk`` was refused
    (measured: 96 MiB kept after two stopped attempts, and the third reached 210 MiB resident
    under a 100 MiB limit). They are taken off the task's allowance.
    """
    global _mallinfo2
    if _mallinfo2 is None:
        try:
            import ctypes

            class Info(ctypes.Structure):
                _fields_ = [(n, ctypes.c_size_t) for n in (
                    "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                    "uordblks", "fordblks", "keepcost")]

            fn = ctypes.CDLL(None).mallinfo2
            fn.restype = Info
            _mallinfo2 = fn
        except (OSError, AttributeError):
            _mallinfo2 = False  # not glibc >= 2.33: the allowance is not reduced
    return int(_mallinfo2().fordblks) if _mallinfo2 else 0


class DataLimit:
    """Lower this process's soft ``RLIMIT_DATA`` to its use now plus ``limit`` bytes (less what
    the C heap holds free, :func:`_heap_free`), and put it back on exit; :attr:`active` says
    whether a limit was set (Linux only: elsewhere there is no /proc/self/statm, and
    RLIMIT_DATA does not cover ``mmap``; the task runs unlimited).

    ``RLIMIT_DATA`` rather than ``RLIMIT_AS``: the address space also counts reservations
    that hold no memory (malloc arenas of threads, 64 MiB each; GPU runtimes' reservations),
    so a task with a few threads would fail far below its limit. What it leaves out: shared
    anonymous mappings (``mmap.mmap(-1, n)``), which a command task's watch would see.
    """

    __slots__ = ("active", "limit", "old")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = False
        self.old: tuple[int, int] = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)

    def __enter__(self) -> DataLimit:
        used = _data_in_use()
        if used is None:
            return self
        try:
            soft, hard = self.old = resource.getrlimit(resource.RLIMIT_DATA)
            want = used + max(self.limit - _heap_free(), 0)
            if hard != resource.RLIM_INFINITY:
                want = min(want, hard)
            if soft == resource.RLIM_INFINITY or want < soft:
                resource.setrlimit(resource.RLIMIT_DATA, (want, hard))
                self.active = True
        except (OSError, ValueError):
            pass
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            resource.setrlimit(resource.RLIMIT_DATA, self.old)
            self.active = False


# --- Python tasks: the peak of each attempt -------------------------------------------------------
#: Python tasks shorter than this are not measured: they record the worker's high-water mark as
#: last read. Reading it costs ~3.5 us (a pread of /proc/self/status, measured on the 2-core
#: development machine), four times what run_python costs a no-op task, so W1 (100,000 no-op
#: tasks) must not pay it, and a task of 0.5 ms pays 0.7 %; in 0.5 ms a task can fault in at
#: most a few MiB more than that mark (page faults run at a few GB/s), which is what a short
#: task's peak can be off by.
PEAK_MIN_S = 5e-4

_RESET = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


class PeakMeter:
    """The resident-memory peak of each Python attempt run in this process.

    The kernel keeps a high-water mark of the process's memory (``VmHWM``). Once an attempt
    raised it (and before the first attempt: start-up's imports and loads are no attempt's),
    the meter marks it stale and resets it when the next attempt begins (:meth:`reset`) --
    then, not at the end of the attempt, so that what the attempt held is freed by then --
    and the next reading is that attempt's own peak. Where the reset is refused the mark only
    grows: peaks are then the worker's peak so far. Every reading includes the worker's own
    memory (interpreter, imports: a few tens of MiB): it is the peak of the process the
    attempt ran in.

    The mark is read from ``/proc/self/status`` (one ``pread`` of a descriptor kept open,
    ~3.5 us), not ``getrusage``'s ``ru_maxrss`` (~0.5 us): that one also holds the mark of
    the process that started this one (the kernel keeps it across ``exec``) and no reset
    lowers it, so a worker started by a large process (a Dask or Ray worker, a test session)
    would report that process's size for every attempt. ``ru_maxrss`` is the fallback where
    there is no ``/proc``.
    """

    __slots__ = ("can_reset", "fd", "mark", "stale")

    def __init__(self) -> None:
        self.mark = 0  # bytes: the high-water mark as last read
        # the mark holds what came before the next attempt (an earlier attempt's peak, or the
        # process's start-up): reset before the next attempt
        self.stale = True
        self.can_reset = True
        self.fd: int | None = None  # /proc/self/status, opened at the first reading; -1: none

    def _read(self) -> int:
        fd = self.fd
        if fd is None:
            try:
                fd = self.fd = os.open(_STATUS, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                fd = self.fd = -1
        if fd >= 0:
            text = os.pread(fd, 4096, 0)
            at = text.find(b"VmHWM:")
            if at >= 0:
                return int(text[at + 6:text.index(b"k", at)]) * 1024  # "VmHWM:  1234 kB"
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    def reset(self) -> None:
        """Start the process's mark from its resident memory now (``5`` written to
        ``/proc/self/clear_refs``, Linux >= 4.0, ~0.6 us); where that is refused, the meter
        stops trying."""
        if not self.can_reset:
            return
        try:
            fd = os.open(_RESET, os.O_WRONLY)
            try:
                os.write(fd, b"5")
            finally:
                os.close(fd)
        except OSError:
            self.can_reset = False

    def begin(self) -> None:
        """An attempt starts after one that raised the mark: start the mark from here."""
        self.stale = False
        self.reset()
        self.mark = self._read()

    def peak(self, seconds: float) -> int:
        """The peak of the attempt that just ended after ``seconds``, in bytes."""
        if seconds < PEAK_MIN_S and self.mark:
            return self.mark
        peak = self._read()
        if peak > self.mark:
            self.mark = peak
            self.stale = True
        return peak

    def forked(self) -> None:
        """In a forked child: its own mark, its own /proc/self/status (the inherited
        descriptor reads the parent's)."""
        if self.fd is not None and self.fd >= 0:
            os.close(self.fd)
        self.fd = None
        self.mark = 0
        self.stale = True


#: One per process: the high-water mark it reads and resets is the process's.
METER = PeakMeter()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=METER.forked)


# --- command tasks: the process group's resident memory -------------------------------------------
#: Seconds between two looks at a limited command's memory. One look scans /proc: ~0.9 ms with
#: 130 processes on the 2-core development machine, so 0.1 s costs under 1 % of a core per
#: running command; a process faulting memory in at ~5 GB/s can pass its limit by ~0.5 GB
#: before the kill.
WATCH_EVERY_S = 0.1


#: Seconds before the first look: a command that ends sooner never pays for one (a look costs
#: about as much as starting a short command), one that starts big is caught this early.
WATCH_FIRST_S = 0.01


def group_members(pgid: int) -> list[int]:
    """The pids of process group ``pgid`` (zombies included).

    ``getpgid()`` is one syscall per process where reading each ``/proc/N/stat`` is an open
    and a read."""
    out = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if name.isdigit():
            pid = int(name)
            try:
                if os.getpgid(pid) == pgid:
                    out.append(pid)
            except OSError:
                continue  # gone meanwhile
    return out


def group_rss(pgid: int) -> int:
    """Resident bytes of every process in group ``pgid``, summed (pages two members share
    count twice: an overestimate, never an underestimate)."""
    total = 0
    for pid in group_members(pgid):
        try:
            with open(f"/proc/{pid}/statm", "rb") as fh:
                total += int(fh.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total * _PAGE


def group_pss(pgid: int) -> int | None:
    """Proportional set size of group ``pgid``, summed, in bytes: a page ``n`` members share
    counts ``1/n`` for each, so forked children sharing their parent's pages count them once.
    None where ``smaps_rollup`` (Linux >= 4.14) cannot be read. ~0.1 ms per member."""
    total = 0
    for pid in group_members(pgid):
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
                for line in fh:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (FileNotFoundError, ProcessLookupError):
            continue  # gone meanwhile (an exiting process's smaps_rollup fails with ESRCH)
        except (OSError, IndexError, ValueError):
            return None
    return total


class GroupWatch:
    """Looks at a command's process group every :data:`WATCH_EVERY_S`; remembers the largest
    use it saw (:attr:`peak`) and says when it passed ``limit``.

    Use is the members' resident memory summed, and, once that passes the limit, their
    proportional set size (:func:`group_pss`), which decides: a process that forked workers
    sharing its pages is not stopped for counting those pages once per worker.
    """

    __slots__ = ("limit", "next_at", "peak", "pgid")

    def __init__(self, pgid: int, limit: int, now: float) -> None:
        self.pgid = pgid
        self.limit = limit
        self.peak = 0
        self.next_at = now + WATCH_FIRST_S

    def over(self, now: float) -> bool:
        """Look if it is time (``now``: monotonic seconds); True once past the limit."""
        if now < self.next_at:
            return False
        self.next_at = now + WATCH_EVERY_S
        use = group_rss(self.pgid)
        if use > self.limit:
            pss = group_pss(self.pgid)
            if pss is not None:
                use = pss
        if use > self.peak:
            self.peak = use
        return use > self.limit

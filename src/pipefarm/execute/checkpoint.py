"""Task checkpoints: state a running task saves for itself, and its next attempt loads.

Inside a Python task::

    import pipefarm as pf

    def count_to(n):
        i = pf.checkpoint.load(default=0)      # where an earlier attempt got to
        while i < n:
            i += 1
            pf.checkpoint.save(i)              # durable before it returns
        return i

A command task submitted with ``checkpoint_dir=True`` (``pipefarm submit --checkpoint-dir``)
gets the same directory as ``$PIPEFARM_CHECKPOINT_DIR`` (created before each attempt) and
writes there what it wants.

Where they live: ``RUN/checkpoints/<task id>/``, in the run directory, so that array workers on
other hosts see them; the directory is the task's and is kept across its attempts (after
``lost``, ``timed_out``, a walltime release or a failure) and after it ends unsuccessfully, so
``pipefarm retry`` resumes too. It is removed when an attempt succeeds, unless the task was
submitted with ``keep_checkpoints=True``.

The files: ``<sequence number, 12 digits>.ckpt``, each one pickled object framed with its length
and a CRC32 (the frame of :mod:`pipefarm.framing`), written under a temporary name,
fsynced and renamed into place. The number is one more than the highest one in the directory,
never a timestamp or a random id, so "the newest" is a plain numeric order. :func:`load` takes the
highest-numbered file that validates; a damaged one is renamed ``<n>.ckpt.corrupt`` (kept for
inspection, its number never reused) and reported once in the attempt's note. Only the newest
:data:`KEEP` files are kept, so a task that saves every step uses at most ``KEEP`` times the size
of its state. Two attempts saving at once (a zombie whose lease was taken over, and its
successor) may write the same number; each file is whole, so a load still gets a whole
checkpoint of that task, if perhaps the zombie's.

Outside a task, :func:`save` and :func:`load` raise :class:`CheckpointError`. In a run without
a run directory (``pf.Executor()`` keeps everything in memory) there is nowhere durable to keep
them: :func:`save` keeps nothing and returns None, :func:`load` returns ``default``.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

from ..errors import PipefarmError

#: The environment variable that gives a command task its checkpoint directory.
CHECKPOINT_DIR_ENV = "PIPEFARM_CHECKPOINT_DIR"
#: Checkpoint files kept per task: the newest and the one before it, so that a newest file
#: damaged after it was written (a disk or a file server that lost it) still leaves one to
#: resume from; older ones are deleted by :func:`save`.
KEEP = 2
SUFFIX = ".ckpt"
CORRUPT_SUFFIX = ".corrupt"
#: digits of the sequence number in a file name: names sort as numbers do
_DIGITS = 12


class CheckpointError(PipefarmError, RuntimeError):
    """A checkpoint call where it cannot work: outside a task."""


class _Context:
    """The running attempt's checkpoint state (one task at a time per process)."""

    __slots__ = ("directory", "task", "attempt", "next_seq", "notes", "touched")

    def __init__(self, directory: str | None, task: int, attempt: int) -> None:
        self.directory = directory
        self.task = task
        self.attempt = attempt
        self.next_seq: int | None = None  # known once the directory was listed
        self.notes: list[str] = []
        self.touched = False  # this attempt wrote into the directory


#: the attempt begun in this process, ``(run_dir, task, attempt)``: only a tuple until the task
#: calls save/load (most tasks never do, and W1 runs 100,000 of them)
_begun: tuple[str | None, int, int] | None = None
_current: _Context | None = None


def task_directory(run_dir: str | os.PathLike[str], task: int) -> str:
    """``RUN/checkpoints/<task>``, absolute: the checkpoint directory of one task (a command
    with a working directory of its own finds it too)."""
    run_dir = os.fspath(run_dir)
    if not os.path.isabs(run_dir):
        run_dir = os.path.abspath(run_dir)
    return os.path.join(run_dir, "checkpoints", str(int(task)))


def begin(run_dir: str | None, task: int, attempt: int) -> None:
    """Make ``task`` the one :func:`save` and :func:`load` act for (called by the worker
    before the attempt runs; no file is touched). ``run_dir`` None: checkpoints are not kept."""
    global _begun, _current
    _begun, _current = (run_dir, task, attempt), None


def end(succeeded: bool, keep: bool) -> str | None:
    """The attempt is over: forget it, and remove the task's directory when it ``succeeded``
    (unless ``keep``). Returns what the attempt's note should say (a skipped damaged file), or
    None.

    The directory is only looked at when it may exist: this attempt wrote into it, or an
    earlier attempt ran (a first attempt that saved nothing costs no file system call).
    """
    global _begun, _current
    begun, ctx = _begun, _current
    _begun = _current = None
    if begun is None:
        return None
    run_dir, task, attempt = begun
    if ctx is None:  # the task never called save, load or directory
        if succeeded and not keep and run_dir and attempt > 1:
            remove(task_directory(run_dir, task))
        return None
    if succeeded and not keep and ctx.directory is not None and (ctx.touched or attempt > 1):
        remove(ctx.directory)
    return "; ".join(ctx.notes) or None


def remove(directory: str) -> None:
    """Delete a task's checkpoint directory and everything in it (gone already: nothing)."""
    try:
        os.rmdir(directory)  # the common case for commands that saved nothing: one call
        return
    except FileNotFoundError:
        return
    except OSError:
        pass
    import shutil

    shutil.rmtree(directory, ignore_errors=True)


def command_directory(run_dir: str | None, task: int, attempt: int) -> str | None:
    """Begin a command attempt: create its task's checkpoint directory and return it (for
    ``$PIPEFARM_CHECKPOINT_DIR``); None without a run directory."""
    begin(run_dir, task, attempt)
    return directory()


def _context() -> _Context:
    global _current
    if _current is None:
        if _begun is None:
            raise CheckpointError(
                "pf.checkpoint.save() and load() work inside a pipefarm task only (a function "
                "run by Run.map/submit_task or pf.Executor); nothing was saved or loaded")
        run_dir, task, attempt = _begun
        _current = _Context(task_directory(run_dir, task) if run_dir else None, task, attempt)
    return _current


def directory() -> str | None:
    """The running task's checkpoint directory (created if needed), for files a task writes
    itself; None where checkpoints are not kept (no run directory)."""
    ctx = _context()
    if ctx.directory is None:
        return None
    os.makedirs(ctx.directory, mode=0o700, exist_ok=True)
    ctx.touched = True
    return ctx.directory


def _seq_of(name: str) -> int | None:
    head, _, rest = name.partition(".")
    if not head.isdigit() or not ("." + rest).startswith(SUFFIX):
        return None
    return int(head)


def _listing(path: str) -> tuple[list[int], int]:
    """The valid-looking checkpoint numbers in ``path`` (newest first) and the next free
    number (after every number used, damaged files included)."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return [], 1
    live, top = [], 0
    for name in names:
        seq = _seq_of(name)
        if seq is None:
            continue
        top = max(top, seq)
        if name.endswith(SUFFIX):
            live.append(seq)
    live.sort(reverse=True)
    return live, top + 1


def _name(path: str, seq: int) -> str:
    return os.path.join(path, f"{seq:0{_DIGITS}d}{SUFFIX}")


def save(obj: Any) -> int | None:
    """Save ``obj`` as the running task's newest checkpoint; durable when this returns.

    Returns its sequence number (None where checkpoints are not kept: no run directory).
    ``obj`` is pickled (cloudpickle when plain pickle cannot); at most 1 GiB once pickled.
    Raises :class:`CheckpointError` outside a task, :class:`TypeError` for an object that
    cannot be pickled, :class:`OSError` when it cannot be written (a full disk: the previous
    checkpoint is untouched).
    """
    ctx = _context()
    if ctx.directory is None:
        return None
    from ..framing import MAX_RECORD, frame, fsync_dir
    from .py import dump_value

    try:
        data = dump_value(obj)
    except Exception as exc:
        raise TypeError(f"checkpoint cannot be pickled: {type(exc).__name__}: {exc}") from exc
    if len(data) > MAX_RECORD:
        raise ValueError(f"checkpoint of {len(data):,} bytes once pickled is over the "
                         f"{MAX_RECORD:,}-byte limit; save less, or write files into "
                         "pf.checkpoint.directory() yourself")
    path = ctx.directory
    if not ctx.touched:
        os.makedirs(path, mode=0o700, exist_ok=True)
    if ctx.next_seq is None:
        ctx.next_seq = _listing(path)[1]
    seq = ctx.next_seq
    final = _name(path, seq)
    tmp = f"{final}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(frame([data]))
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, final)
    fsync_dir(path)  # the new name is durable before the older files go
    ctx.touched = True
    ctx.next_seq = seq + 1
    for old in _listing(path)[0][KEEP:]:
        _unlink(_name(path, old))
    return seq


def load(default: Any = None) -> Any:
    """The running task's newest valid checkpoint, or ``default`` when it has none.

    A damaged file (torn, truncated, flipped bits: its checksum disagrees) is skipped in favour
    of the one before it, renamed ``*.ckpt.corrupt`` and named in the attempt's note. An intact
    file whose object cannot be unpickled here raises what :func:`pickle.loads` raised. Raises
    :class:`CheckpointError` outside a task.
    """
    ctx = _context()
    if ctx.directory is None:
        return default
    from ..framing import read_journal

    live, nxt = _listing(ctx.directory)
    if ctx.next_seq is None:
        ctx.next_seq = nxt
    for seq in live:
        path = _name(ctx.directory, seq)
        got = read_journal(path)
        if got.status == "ok" and len(got.records) == 1 and got.offset == _size(path):
            # intact: an object this code cannot rebuild (a class renamed since) is the
            # task's error to see, not damage to skip
            return pickle.loads(got.records[0])
        why = got.reason or "not one whole record"
        ctx.notes.append(f"checkpoint {os.path.basename(path)} skipped ({why})")
        try:
            os.replace(path, path + CORRUPT_SUFFIX)
        except OSError:
            pass
    return default


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

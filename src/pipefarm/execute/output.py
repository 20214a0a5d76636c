"""Where command output goes: a few append-only files per worker, and how to read it back.

Default mode: every attempt a worker runs appends its stdout to ``<log_dir>/<worker>.out`` and
its stderr to ``<log_dir>/<worker>.err`` -- two files per worker however many tasks it runs, so
a million tasks cost no million metadata operations on a shared filesystem. Each attempt gets
a compact reference (``CmdResult.output``) listing the (offset, length) extents its bytes
occupy; :func:`read_output` turns that back into exactly what the attempt printed.
``per_task=True`` instead writes ``<log_dir>/tasks/<task>.<attempt>.<worker>.out|.err``
(created only for a stream that printed something), for users who want plain files.

Why the worker reads the pipes itself rather than pointing the child's stdout at the log file:
a child writing straight into the file would be faster (no copy through the worker), but then
nothing can enforce the output cap while the command runs -- a runaway command would fill the
disk before we could truncate -- and two attempts running at once in one worker would
interleave in the file with no way to tell whose bytes are whose. Reading the pipes costs one
read and (buffered) one write per 64 KiB, which is noise next to a process spawn.

Attempts running at the same time in one worker (threads) each buffer up to 64 KiB and append
whole buffers under a lock; an attempt that runs alone gets one contiguous extent per stream.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

#: Name of the log folder inside a run directory.
LOG_DIRNAME = "logs"
#: Name of the per-attempt folder inside the log folder (``per_task`` mode).
TASKS_DIRNAME = "tasks"
SUFFIXES = (".out", ".err")
STREAMS = ("stdout", "stderr")
_FLUSH_BYTES = 1 << 16

#: Past the cap, the *end* of a stream is kept too (errors come last): up to this many bytes of
#: it wait in memory until the attempt ends, so memory per running attempt stays bounded
#: whatever the cap, and nothing beyond the cap is ever written.
TAIL_MAX_BYTES = 1 << 20
#: Below this much room for the tail (caps under 256 bytes) only the head is kept: the marker
#: line alone would fill the room.
TAIL_MIN_BYTES = 128


def cut_marker(n: int) -> bytes:
    """The line ``logs`` shows where ``n`` bytes were cut out of a stream."""
    return f"[pipefarm: {n:,} bytes cut]\n".encode()


class OutputUnavailable(OSError):
    """An attempt's output cannot be read back: its log file is missing or shorter than recorded."""


def _check_worker_id(worker_id: str) -> None:
    if not worker_id or worker_id in (".", "..") or "/" in worker_id or "\0" in worker_id:
        raise ValueError(f"worker id {worker_id!r} cannot name a log file")


class OutputSink:
    """Receives the stdout/stderr of every attempt one worker runs (thread-safe).

    Files are created on first use (a worker that prints nothing creates none), private
    (0600, folder 0700), opened append-only, and stay open until :meth:`close`.
    """

    def __init__(self, log_dir: Path, worker_id: str, per_task: bool = False) -> None:
        _check_worker_id(worker_id)
        self.log_dir = Path(log_dir)
        self.worker_id = worker_id
        self.per_task = per_task
        self._fds: list[int | None] = [None, None]
        self._locks = (threading.Lock(), threading.Lock())
        self._dirs: set[Path] = set()

    def attempt(
        self, task: int, attempt: int, cap: int, per_task: bool | None = None
    ) -> AttemptOutput:
        """Start collecting one attempt's output; at most ``cap`` bytes per stream are kept.

        ``per_task`` overrides the sink's mode for this attempt (a Command that asks for its
        own files gets them even from a worker whose sink was made for shared files).
        """
        mode = self.per_task if per_task is None else per_task
        return AttemptOutput(self, task, attempt, cap, mode)

    def _mkdir(self, path: Path) -> None:
        if path not in self._dirs:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._dirs.add(path)

    def _append(self, stream: int, data: bytes | memoryview, extents: list[list[int]]) -> None:
        """Append ``data`` to this worker's file for ``stream``, recording where it landed."""
        with self._locks[stream]:
            fd = self._fds[stream]
            if fd is None:
                self._mkdir(self.log_dir)
                path = self.log_dir / (self.worker_id + SUFFIXES[stream])
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
                self._fds[stream] = fd
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                # O_APPEND puts each write at the current end even if another process (a
                # restarted worker with the same id) appends too; the file position after the
                # write tells where ours went.
                end = os.lseek(fd, 0, os.SEEK_CUR)
                off = end - n
                if extents and extents[-1][0] + extents[-1][1] == off:
                    extents[-1][1] += n
                else:
                    extents.append([off, n])
                view = view[n:]

    def sync(self) -> None:
        """fsync the worker's log files: call before recording references durably."""
        for stream in (0, 1):
            with self._locks[stream]:
                fd = self._fds[stream]
                if fd is not None:
                    os.fsync(fd)

    def close(self) -> None:
        """Close the log files (the sink reopens them if used again)."""
        for stream in (0, 1):
            with self._locks[stream]:
                fd = self._fds[stream]
                self._fds[stream] = None
                if fd is not None:
                    os.close(fd)

    def __enter__(self) -> OutputSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AttemptOutput:
    """The output of one attempt on its way to disk; the cap is enforced as bytes arrive.

    Past the cap the head is kept on disk as it arrives and the last bytes wait in a bounded
    buffer (:data:`TAIL_MAX_BYTES`, at most half the cap); when the attempt ends they follow
    the head after a :func:`cut_marker` line, all within the cap.
    """

    __slots__ = ("sink", "task", "attempt", "cap", "per_task", "seen", "kept", "errors",
                 "_bufs", "_extents", "_fds", "_stem", "_written", "_head", "_tails",
                 "_last")

    def __init__(
        self, sink: OutputSink, task: int, attempt: int, cap: int, per_task: bool = False
    ) -> None:
        self.sink = sink
        self.per_task = per_task
        self.task = task
        self.attempt = attempt
        self.cap = cap
        self.seen = [0, 0]  # bytes the command printed
        self.kept = [0, 0]  # bytes that are on disk (or buffered for it)
        self._written = [0, 0]  # per_task mode: bytes in the attempt's own files
        self.errors: list[str | None] = [None, None]
        self._bufs = (bytearray(), bytearray())
        self._extents: tuple[list[list[int]], list[list[int]]] = ([], [])
        self._fds: list[int | None] = [None, None]
        self._stem = f"{task}.{attempt}.{sink.worker_id}"
        tail = min(cap // 2, TAIL_MAX_BYTES)
        tail = tail if tail >= TAIL_MIN_BYTES else 0
        self._head = cap - tail  # bytes per stream written as they come
        self._tails = (bytearray(), bytearray())
        self._last = [b"\n", b"\n"]  # the last byte of the head: the marker starts a line

    def write(self, stream: int, data: bytes) -> None:
        """Take bytes the command printed on ``stream`` (0 stdout, 1 stderr)."""
        n = len(data)
        self.seen[stream] += n
        if self.errors[stream] is not None:
            return  # the log is failing: count, do not keep
        room = self._head - self.kept[stream]
        if n > room:
            rest = data[max(room, 0):]
            if self.cap > self._head and rest:
                tail = self._tails[stream]
                keep = self.cap - self._head
                tail += rest[-keep:]
                if len(tail) > keep:
                    del tail[: len(tail) - keep]
            if room <= 0:
                return
            data = data[:room]
            n = room
        self.kept[stream] += n
        self._last[stream] = data[-1:]
        buf = self._bufs[stream]
        if not buf and n >= _FLUSH_BYTES:
            self._write(stream, data)  # a full chunk: skip the copy into the buffer
            return
        buf += data
        if len(buf) >= _FLUSH_BYTES:
            self._flush(stream)

    def pending(self) -> bool:
        """Whether some output is buffered in memory, not yet on disk."""
        return bool(self._bufs[0]) or bool(self._bufs[1])

    def flush(self) -> None:
        """Push buffered output to disk (so that a live tail sees it)."""
        for stream in (0, 1):
            if self._bufs[stream]:
                self._flush(stream)

    def _flush(self, stream: int) -> None:
        buf = self._bufs[stream]
        self._write(stream, bytes(buf))
        buf.clear()

    def _write(self, stream: int, data: bytes | memoryview) -> None:
        try:
            if self.per_task:
                fd = self._fds[stream]
                if fd is None:
                    folder = self.sink.log_dir / TASKS_DIRNAME
                    self.sink._mkdir(folder)
                    path = folder / (self._stem + SUFFIXES[stream])
                    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
                    fd = self._fds[stream] = os.open(path, flags, 0o600)
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    self._written[stream] += n
                    view = view[n:]
            else:
                self.sink._append(stream, data, self._extents[stream])
        except OSError as exc:  # disk full, quota: keep running, say what was not kept
            self.errors[stream] = exc.strerror or str(exc)
            if not self.per_task:
                self._written[stream] = sum(e[1] for e in self._extents[stream])
            self.kept[stream] = self._written[stream]
            self._bufs[stream].clear()

    def _write_tail(self, stream: int) -> None:
        """The end of a stream that went past the head: all of it when the whole stream fits
        the cap, else a marker line and as much of the end as the cap leaves room for."""
        tail = self._tails[stream]
        if not tail or self.errors[stream] is not None:
            return
        cut = self.seen[stream] - self.kept[stream] - len(tail)
        out: bytes | bytearray = tail
        if cut > 0:
            lead = b"" if self._last[stream] == b"\n" else b"\n"
            marker = lead + cut_marker(cut)
            for _ in range(3):  # the marker's own length is cut from the tail too
                marker = lead + cut_marker(cut + len(marker))
            out = marker + tail[len(marker):]
        self.kept[stream] += len(out)
        self._bufs[stream].extend(out)
        self._flush(stream)
        tail.clear()

    def finish(self) -> tuple[str | None, str | None]:
        """Flush, close, and return ``(reference for read_output, note)``; either may be None."""
        for stream in (0, 1):
            self._write_tail(stream)
        self.flush()
        for stream in (0, 1):
            fd = self._fds[stream]
            if fd is not None:
                self._fds[stream] = None
                os.close(fd)
        notes = []
        for stream in (0, 1):
            name = STREAMS[stream]
            if self.errors[stream] is not None:
                notes.append(
                    f"{name}: writing the log failed ({self.errors[stream]}); "
                    f"{self.seen[stream] - self.kept[stream]} of {self.seen[stream]} bytes not kept"
                )
            elif self.seen[stream] > self.kept[stream]:
                notes.append(f"{name} cut at {self.kept[stream]} of {self.seen[stream]} bytes"
                             + (" (head and tail kept)" if self.cap > self._head else ""))
        note = "; ".join(notes) or None
        if not (self.kept[0] or self.kept[1]):
            return None, note
        if self.per_task:
            ref = f"t{self.kept[0]}/{self.kept[1]}/{self._stem}"
        else:
            ext = [",".join(f"{o}+{n}" for o, n in self._extents[s]) for s in (0, 1)]
            ref = f"s{ext[0]}/{ext[1]}/{self.sink.worker_id}"
        return ref, note


def _locate(base: Path, rel: str) -> Path:
    for folder in (base, base / LOG_DIRNAME):
        path = folder / rel
        if path.exists():
            return path
    raise OutputUnavailable(f"output file {rel!r} is in neither {base} nor {base / LOG_DIRNAME}")


def _read_extents(path: Path, extents: list[tuple[int, int]]) -> bytes:
    parts = []
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        for off, n in extents:
            while n > 0:
                chunk = os.pread(fd, min(n, 1 << 24), off)
                if not chunk:
                    raise OutputUnavailable(f"{path} ends before offset {off + n}: output lost")
                parts.append(chunk)
                off += len(chunk)
                n -= len(chunk)
    return b"".join(parts)


def read_output(run_dir_or_log_dir: Path | str, ref: str | None, stream: str) -> bytes:
    """Exactly the bytes one attempt printed on ``stream`` ("stdout" or "stderr").

    ``ref`` is ``CmdResult.output``; None (nothing printed) gives ``b""``. The folder may be
    the run directory (logs under ``logs/``) or the log folder itself.
    Raises :class:`OutputUnavailable` when the log is missing or shorter than recorded.
    """
    try:
        s = STREAMS.index(stream)
    except ValueError:
        raise ValueError(f"stream must be 'stdout' or 'stderr', not {stream!r}") from None
    if not ref:
        return b""
    base = Path(run_dir_or_log_dir)
    kind, body = ref[0], ref[1:]
    try:
        first, second, name = body.split("/", 2)
        _check_worker_id(name)  # a file name, never a path: no "../" tricks
        if kind == "s":
            spec = (first, second)[s]
            if not spec:
                return b""
            extents = []
            for item in spec.split(","):
                off, _, n = item.partition("+")
                extents.append((int(off), int(n)))
            return _read_extents(_locate(base, name + SUFFIXES[s]), extents)
        if kind == "t":
            n = int((first, second)[s])
            if n == 0:
                return b""
            return _read_extents(_locate(base, f"{TASKS_DIRNAME}/{name}{SUFFIXES[s]}"), [(0, n)])
    except ValueError:
        pass
    raise ValueError(f"not an output reference: {ref!r}")


#: ``logs/<worker>.live``: where the worker's running attempt's output starts (written by
#: the local workers for attempts that run a while; read by :func:`follow_output`).
LIVE_SUFFIX = ".live"
#: How often ``pipefarm logs --follow`` looks for new output and for the attempt's end.
FOLLOW_POLL_S = 0.2


def write_live(path: str, info: tuple[int, int, str, int, int]) -> None:
    """Replace the live file at ``path`` with ``info`` (one line; atomic by rename)."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (" ".join(map(str, info)) + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_live(path: str) -> tuple[int, int, str, int, int] | None:
    """What :func:`write_live` wrote, or None (no file, or torn)."""
    try:
        with open(path, encoding="ascii") as f:
            task, attempt, kind, out, err = f.read().split()
        return int(task), int(attempt), kind, int(out), int(err)
    except (OSError, ValueError):
        return None


def follow_output(
    run_dir: Path | str,
    task: int,
    stream: str,
    poll: Callable[[], tuple[str, str | None, int]],
    final_ref: Callable[[int | None], str | None],
    write: Callable[[bytes], None],
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Write what ``task`` prints on ``stream`` as it prints it, until its attempt ends.

    ``poll()`` gives the task's ``(state label, worker, attempt)``; ``final_ref(attempt)`` the
    output reference of an ended attempt (None: the latest). A task not started yet is waited
    for; an ended one is written whole. Output is read from the worker's log file from where
    its live file says the attempt began; once the attempt ends, the rest comes from its
    recorded reference (so the end of a capped stream and its cut marker show too).
    """
    s = STREAMS.index(stream)
    logs = Path(run_dir) / LOG_DIRNAME
    following: int | None = None
    printed = 0
    while True:
        state, worker, attempt = poll()
        active = state in ("claimed", "running")
        if following is not None and (not active or attempt != following):
            write(read_output(run_dir, final_ref(following), stream)[printed:])
            return
        if not active:
            if state in ("ready", "blocked"):  # not started (or waiting for a retry)
                sleep(FOLLOW_POLL_S)
                continue
            write(read_output(run_dir, final_ref(None), stream))
            return
        info = read_live(str(logs / f"{worker}{LIVE_SUFFIX}")) if worker else None
        if info is not None and info[0] == task and info[1] == attempt:
            following = attempt
            if info[2] == "t":
                path = logs / TASKS_DIRNAME / f"{task}.{attempt}.{worker}{SUFFIXES[s]}"
            else:
                path = logs / f"{worker}{SUFFIXES[s]}"
            try:
                with open(path, "rb") as f:
                    f.seek(info[3 + s] + printed)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            if data:
                write(data)
                printed += len(data)
        sleep(FOLLOW_POLL_S)

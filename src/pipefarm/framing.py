"""Framed records in append-only files: the format, its reader and its single appender.

A framed file is a sequence of frames. Each frame is a 9-byte header followed by the payload::

    <B  magic/version byte (0xA1: "pipefarm journal, frame format 1")
    <I  payload length in bytes
    <I  crc32 (zlib) of the 5 header bytes above followed by the payload

The checksum covers the length as well as the payload, so a damaged length field is caught
instead of sending the reader off to a wrong offset.

Only the file's owner appends, and it does so with one ``os.write`` per batch of records, so a
crash can leave at most one partial batch at the end of the file: a *torn tail*. Readers ignore
a torn tail; the owner truncates it when it reopens the file ("repaired by its owner"). Damage
anywhere else ("garbage in the middle") is never papered over: readers stop there and say so,
and the writer refuses to append unless told to truncate.

Three users, each with its own records: the array workers' journals (:mod:`pipefarm.store.journal`),
the result cache's packs (:mod:`pipefarm.cache.entries`) and task checkpoints
(:mod:`pipefarm.execute.checkpoint`). It is a leaf: it imports nothing of pipefarm.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from typing import Literal

MAGIC = 0xA1
MAGIC_BYTE = bytes([MAGIC])
HEADER = struct.Struct("<BII")
HEADER_SIZE = HEADER.size  # 9
#: Upper bound on one payload; a larger length field means damage, not a big record.
MAX_RECORD = 1 << 30

ReadStatus = Literal["ok", "torn", "corrupt"]


class JournalCorruptError(ValueError):
    """A journal is damaged before its tail, so appending would bury the damage."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"{path}: journal damaged at byte {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


# --------------------------------------------------------------------------------------- framing
def frame(records: list[bytes]) -> bytes:
    """The framed bytes of ``records``, ready to append as one write."""
    parts: list[bytes] = []
    for rec in records:
        n = len(rec)
        if n > MAX_RECORD:
            raise ValueError(f"journal record of {n} bytes exceeds the {MAX_RECORD}-byte limit")
        head = struct.pack("<BI", MAGIC, n)
        parts.append(HEADER.pack(MAGIC, n, zlib.crc32(rec, zlib.crc32(head))))
        parts.append(rec)
    return b"".join(parts)


def scan_frames(buf: bytes | memoryview) -> tuple[list[bytes], int, ReadStatus, str]:
    """Split ``buf`` into valid records; stop at the first frame that is not.

    Returns ``(records, consumed, status, reason)``. A bad frame is ``"torn"`` when nothing
    valid follows it: an unfinished append, or the partial or zero-filled last batch a crash
    leaves. It is ``"corrupt"`` when a valid frame follows it, i.e. data was damaged after it
    was written (a torn tail is never followed by good data, because the owner truncates it
    before appending again).
    """
    raw = bytes(buf)
    end = len(raw)
    pos = 0
    records: list[bytes] = []
    append = records.append
    unpack = HEADER.unpack_from
    crc32 = zlib.crc32
    view = memoryview(raw)
    # the fast path, inlined (this loop runs once per record the coordinator folds)
    while end - pos >= HEADER_SIZE:
        magic, n, crc = unpack(raw, pos)
        start = pos + HEADER_SIZE
        stop = start + n
        if (
            magic != MAGIC
            or stop > end
            or crc32(view[start:stop], crc32(view[pos : pos + 5])) != crc
        ):
            break
        append(raw[start:stop])
        pos = stop
    if pos == end:
        return records, pos, "ok", ""
    why = check_frame(view, pos, end)[2]
    if _valid_frame_after(view, pos + 1, end):
        return records, pos, "corrupt", why
    return records, pos, "torn", why


def check_frame(view: memoryview, pos: int, end: int) -> tuple[bool, int, str]:
    """Whether a whole valid frame starts at ``pos``: ``(ok, payload length, reason)``."""
    if end - pos < HEADER_SIZE:
        return False, 0, "partial frame header"
    magic, n, crc = HEADER.unpack_from(view, pos)
    if magic != MAGIC:
        return False, 0, f"bad magic byte 0x{magic:02x}"
    if n > MAX_RECORD:
        return False, 0, f"length field {n} too large"
    stop = pos + HEADER_SIZE + n
    if stop > end:
        return False, 0, "frame runs past the end of the file"
    if zlib.crc32(view[pos + HEADER_SIZE : stop], zlib.crc32(view[pos : pos + 5])) != crc:
        return False, 0, "checksum mismatch"
    return True, n, ""


#: How many payload bytes the search for a valid frame behind damage may checksum before it
#: gives up and calls the damage corrupt (the cautious answer: never truncate what may be data).
_RESYNC_BUDGET = 64 << 20


def _valid_frame_after(view: memoryview, start: int, end: int) -> bool:
    """Whether any valid frame starts at or after ``start`` (a resync scan by magic byte)."""
    raw = view.obj if isinstance(view.obj, bytes) and len(view.obj) == end else bytes(view)
    budget = _RESYNC_BUDGET
    pos = raw.find(MAGIC_BYTE, start)
    while 0 <= pos <= end - HEADER_SIZE:
        _, n, _ = HEADER.unpack_from(raw, pos)
        if n <= MAX_RECORD and pos + HEADER_SIZE + n <= end:
            budget -= n
            if budget < 0:
                return True
            if check_frame(view, pos, end)[0]:
                return True
        pos = raw.find(MAGIC_BYTE, pos + 1)
    return False


class JournalRead(tuple):
    """What :func:`read_journal` returns: unpacks as ``(records, new_offset)``.

    Extra attributes: ``status`` (``"ok"``, ``"torn"`` or ``"corrupt"``), ``reason`` (why the
    read stopped early, empty when ``ok``) and ``corrupt`` (True when the caller should warn:
    the journal is damaged before its end and will not advance past ``offset`` by itself).
    On NFS a reader can glimpse a live writer's batch with a later page visible before an
    earlier one, which reads as ``corrupt`` once; warn when it persists across polls.
    """

    status: ReadStatus
    reason: str

    def __new__(
        cls, records: list[bytes], offset: int, status: ReadStatus = "ok", reason: str = ""
    ) -> JournalRead:
        self = super().__new__(cls, (records, offset))
        self.status = status
        self.reason = reason
        return self

    @property
    def records(self) -> list[bytes]:
        return self[0]

    @property
    def offset(self) -> int:
        return self[1]

    @property
    def corrupt(self) -> bool:
        return self.status == "corrupt"

    def __repr__(self) -> str:
        return f"JournalRead({len(self[0])} records, offset={self[1]}, status={self.status!r}" + (
            f", reason={self.reason!r})" if self.reason else ")"
        )


def read_journal(path: str | os.PathLike[str], offset: int = 0) -> JournalRead:
    """Read the complete, valid records of a journal from ``offset``; never raises on damage.

    Returns ``(records, new_offset)`` where ``new_offset`` is just after the last good record:
    keep it as the journal's cursor and pass it back next time, so folding is incremental and
    idempotent. A missing file reads as empty. Reading stops at the first torn or damaged
    frame; the result's ``status`` / ``corrupt`` say which (see :class:`JournalRead`).
    """
    if offset < 0:
        raise ValueError("offset must be >= 0")
    try:
        # open afresh on every call: NFS's close-to-open consistency makes a new open see
        # what other hosts have written and closed
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            buf = f.read()
    except FileNotFoundError:
        return JournalRead([], offset)
    records, consumed, status, reason = scan_frames(buf)
    return JournalRead(records, offset + consumed, status, reason)


# ---------------------------------------------------------------------------------------- writer
class JournalWriter:
    """The single appender of one journal file.

    ``fsync=True`` (the default) makes every :meth:`append` durable before it returns, with one
    fsync per call however many records it carries. ``fsync_interval > 0`` groups them: at most
    one fsync per interval (plus one in :meth:`sync` and :meth:`close`), trading the last
    interval's records on power loss for fewer flushes. ``fsync=False`` leaves it to the OS.

    On open the existing file is validated; a torn tail is truncated. Damage before the tail
    raises :class:`JournalCorruptError` unless ``on_corrupt="truncate"``, which cuts the file
    at the damage (losing everything after it).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: bool = True,
        fsync_interval: float = 0.0,
        on_corrupt: Literal["raise", "truncate"] = "raise",
    ) -> None:
        self.path = os.fspath(path)
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self._dirty = False
        self._last_sync = float("-inf")  # the first append always syncs
        existed = os.path.exists(self.path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            self.repaired = self._repair(on_corrupt)
            if not existed and fsync:
                fsync_dir(os.path.dirname(self.path) or ".")  # make the new name durable
        except BaseException:
            os.close(self._fd)
            raise

    def _repair(self, on_corrupt: str) -> int:
        """Validate the file; truncate a torn tail. Returns the number of bytes cut."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            self.size = 0
            return 0
        buf = os.pread(self._fd, size, 0)
        _, good, status, reason = scan_frames(buf)
        if status == "corrupt" and on_corrupt != "truncate":
            raise JournalCorruptError(self.path, good, reason)
        if good < size:
            os.ftruncate(self._fd, good)
            self._sync_now()
        self.size = good
        return size - good

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def append(self, records: list[bytes]) -> int:
        """Append ``records`` in one write (then fsync by policy); return the new file size."""
        if self._fd < 0:
            raise ValueError("journal writer is closed")
        if not records:
            return self.size
        data = frame(records)
        try:
            view = memoryview(data)
            written = os.write(self._fd, view)
            # a short write is rare (huge batches, some filesystems); finish it rather than
            # leave a torn frame behind a live writer
            while written < len(data):
                written += os.write(self._fd, view[written:])
        except BaseException:
            # e.g. ENOSPC half-way: cut back to the last whole batch so the file stays clean
            try:
                os.ftruncate(self._fd, self.size)
            except OSError:
                pass  # the reader ignores a torn tail and the next open repairs it
            raise
        self.size += len(data)
        self._dirty = True
        if self.fsync:
            now = time.monotonic()
            if self.fsync_interval <= 0 or now - self._last_sync >= self.fsync_interval:
                self._sync_now(now)
        return self.size

    def sync(self) -> None:
        """Make everything appended so far durable."""
        if self._fd >= 0 and self._dirty:
            self._sync_now()

    def _sync_now(self, now: float | None = None) -> None:
        # fdatasync also flushes the file size, which is all the metadata a reader needs
        getattr(os, "fdatasync", os.fsync)(self._fd)
        self._dirty = False
        self._last_sync = time.monotonic() if now is None else now

    def close(self) -> None:
        """Sync (unless ``fsync=False``) and close. Idempotent."""
        if self._fd < 0:
            return
        try:
            if self.fsync:
                self.sync()
        finally:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> JournalWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # not supported here (some filesystems); the file itself is still synced
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

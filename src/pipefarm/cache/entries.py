"""The cache's entries: append-only pack files of checksummed records, and their index.

A cache directory may sit on a shared filesystem and serve many runs and hosts at once, so it
holds no SQLite (its locking is unreliable on NFS) and no per-entry metadata operation::

    CACHE/packs/<host>-<pid>-<random>.pack   one per writing process, append-only
    CACHE/blobs/<sha256>                     results larger than BLOB_ABOVE, named by hash

A pack is a journal (:mod:`pipefarm.framing`: length + crc32 per record); each
record is one batch of entries written together::

    <B version> <I n> | n keys of 32 bytes | msgpack [[written_at, name, result, blob], ...]

A reader builds an in-memory index (key -> record and position) by scanning the packs,
incrementally by offset; a hit decodes its record's entries (one C call for the whole batch,
kept for the next hits of the same record) through a memory map. A record whose checksum fails is skipped with its entries, counted
and reported (:class:`CacheWarning`, ``pipefarm cache stats``): those tasks run again. Batching
entries into one record costs a damaged record all of its entries (recomputed, never served),
and buys a scan of ~0.15 us per entry instead of ~2 us (100,000 entries, measured here).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import secrets
import socket
import struct
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

import msgspec

from ..framing import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAGIC_BYTE,
    MAX_RECORD,
    JournalWriter,
    check_frame,
    frame,
    scan_frames,
)
from ..store.base import check_private

#: Results larger than this go to a file of their own under ``blobs/``: a reader scans (and
#: checksums) every byte of the packs, so large results there would slow every start; above
#: 4 KB one file per result costs less than reading the result itself.
BLOB_ABOVE = 4096
#: Entries per record at most (a record's ``n`` and the index's locator hold 16 bits).
MAX_BATCH = 0xFFFF
#: A lookup that misses looks for new entries (other runs' writes) at most this often: a
#: directory listing and a stat per pack, cheap, but not per task.
REFRESH_S = 1.0
#: A pack whose end is an incomplete record is called damaged only when it has not been
#: written for this long (before that a writer may be in the middle of an append).
TORN_AFTER_S = 5.0

_VERSION = 1
_HEAD = struct.Struct("<BI")
#: records whose entries were decoded, kept for the hits that follow (lookups go in the order
#: entries were written: a run's rerun reads each record once)
DECODED_KEPT = 8
_ENTRY = msgspec.msgpack.Encoder()
EntryData = tuple[float, str, bytes | None, str | None]  # written_at, name, result, blob
_decode_entries = msgspec.msgpack.Decoder(list[EntryData]).decode


class CacheWarning(UserWarning):
    """The result cache found damaged entries (skipped: their tasks run again)."""


def default_dir(explicit: str | os.PathLike[str] | None = None) -> str:
    """The cache directory: ``explicit`` (``cache_dir=``, ``--cache-dir``), else
    ``$PIPEFARM_CACHE``, else ``$XDG_CACHE_HOME/pipefarm``, else ``~/.cache/pipefarm``;
    absolute."""
    where = explicit or os.environ.get("PIPEFARM_CACHE")
    if not where:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        where = os.path.join(base, "pipefarm")
    return os.path.abspath(os.path.expanduser(os.fspath(where)))


def prepare(path: str | os.PathLike[str] | None) -> Path:
    """The cache directory ``path`` (see :func:`default_dir`), created private (0700) where
    it is missing; :class:`~pipefarm.errors.UnsafeRun` when other users can write it."""
    where = Path(default_dir(path))
    for d in (where, where / "packs", where / "blobs"):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_private(d)
    return where


@dataclass
class _Pack:
    path: Path
    scanned: int = 0  # bytes read and indexed (the start of the next scan)
    map: mmap.mmap | None = None
    damaged: int = 0  # records skipped for a bad checksum (their entries: damaged_entries)
    torn: int = 0  # bytes of an incomplete record at the end (0: none)


@dataclass
class Stats:
    """What ``pipefarm cache stats`` reports."""

    path: str
    entries: int = 0  # distinct keys
    packs: int = 0
    pack_bytes: int = 0
    blobs: int = 0
    blob_bytes: int = 0
    damaged_records: int = 0
    torn_bytes: int = 0
    oldest: float | None = None
    newest: float | None = None
    by_name: dict[str, int] = field(default_factory=dict)


class Entry(msgspec.Struct, frozen=True):
    """One cached result as ``pipefarm cache list`` shows it."""

    key: bytes
    written_at: float
    name: str
    size: int  # bytes of the pickled result
    in_blob: bool


class ResultCache:
    """One cache directory, opened for lookups and writes by this process.

    Opening refuses (:class:`~pipefarm.errors.UnsafeRun`) a directory other users can write:
    its entries are pickles this process would load. The directory is created private (0700).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = prepare(path)
        self._packs: dict[str, _Pack] = {}
        self._order: list[_Pack] = []  # by number: locators name packs by position here
        # key -> locator: record number << 16 | entry number; records: (pack, payload offset,
        # entries, payload length)
        self.index: dict[bytes, int] = {}
        self._records: list[tuple[_Pack, int, int, int]] = []
        self._decoded: dict[int, list[EntryData]] = {}  # record number -> its entries
        self._writer: JournalWriter | None = None
        self._own: _Pack | None = None
        self._last_refresh = float("-inf")
        self.refresh()

    # --- reading ---------------------------------------------------------------------------------
    def refresh(self, *, force: bool = True) -> None:
        """Index what other writers appended since the last look (``force=False``: only when
        :data:`REFRESH_S` has passed)."""
        now = time.monotonic()
        if not force and now - self._last_refresh < REFRESH_S:
            return
        self._last_refresh = now
        try:
            names = sorted(os.listdir(self.path / "packs"))
        except FileNotFoundError:
            names = []
        for name in names:
            if not name.endswith(".pack"):
                continue
            pack = self._packs.get(name)
            if pack is None:
                pack = self._packs[name] = _Pack(self.path / "packs" / name)
                self._order.append(pack)
            self._scan_pack(pack)

    def _scan_pack(self, pack: _Pack) -> None:
        try:
            fd = os.open(pack.path, os.O_RDONLY)
        except FileNotFoundError:  # compacted away meanwhile
            return
        try:
            st = os.fstat(fd)
            if st.st_size <= pack.scanned:
                return
            buf = os.pread(fd, st.st_size - pack.scanned, pack.scanned)
        finally:
            os.close(fd)
        view = memoryview(buf)
        pos, end = 0, len(buf)
        bad_before = pack.damaged
        while pos < end:
            records, used, status, _ = scan_frames(view[pos:])
            at = pack.scanned + pos
            for rec in records:
                self._index_record(pack, at + HEADER_SIZE, rec)
                at += HEADER_SIZE + len(rec)
            pos += used
            if status == "ok":
                break
            nxt = _next_frame(view, pos + 1, end)
            if nxt < 0 and _whole_frame(view, pos, end):  # the last record, complete but bad
                nxt = end
            if nxt < 0:  # an incomplete record at the end: a writer died, or is writing
                pack.torn = end - pos
                if time.time() - st.st_mtime > TORN_AFTER_S:
                    warnings.warn(f"result cache {self.path}: {pack.path.name} ends with an"
                                  f" incomplete record ({end - pos} bytes, skipped): the"
                                  " entries in it are computed again", CacheWarning, stacklevel=3)
                break
            pack.damaged += 1
            pos = nxt
        else:
            pack.torn = 0
        pack.scanned += pos
        if pack.damaged > bad_before:
            warnings.warn(f"result cache {self.path}: {pack.damaged - bad_before} damaged"
                          f" record(s) in {pack.path.name} (checksum) skipped: the entries in"
                          " them are computed again (any `pipefarm cache clear` rewrites the"
                          " packs without them)", CacheWarning, stacklevel=3)

    def _index_record(self, pack: _Pack, offset: int, rec: bytes,
                      keys: list[bytes] | None = None) -> None:
        """Index the record ``rec`` found at ``offset`` of ``pack`` (``keys``: its keys, when
        this process wrote it)."""
        if len(rec) < _HEAD.size:
            return
        version, n = _HEAD.unpack_from(rec)
        if version != _VERSION or len(rec) < _HEAD.size + 32 * n:
            return  # a newer pipefarm's record: not ours to read
        number = len(self._records)
        self._records.append((pack, offset, n, len(rec)))
        base = number << 16
        if keys is None:
            raw = rec[_HEAD.size:_HEAD.size + 32 * n]
            keys = [raw[i:i + 32] for i in range(0, 32 * n, 32)]
        self.index.update(zip(keys, range(base, base + n), strict=True))

    def _entry(self, locator: int) -> EntryData:
        entries = self._decoded.get(locator >> 16)
        if entries is None:
            entries = self._decode(locator >> 16)
        return entries[locator & 0xFFFF]

    def _decode(self, number: int) -> list[EntryData]:
        """The entries of record ``number``, decoded and kept (the last DECODED_KEPT)."""
        pack, offset, n, length = self._records[number]
        m = pack.map
        if m is None or len(m) < offset + length:
            m = self._map(pack)
        start = offset + _HEAD.size + 32 * n
        if len(self._decoded) >= DECODED_KEPT:
            self._decoded.pop(next(iter(self._decoded)))
        got = self._decoded[number] = _decode_entries(m[start:offset + length])
        return got

    def _map(self, pack: _Pack) -> mmap.mmap:
        with open(pack.path, "rb") as f:
            pack.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return pack.map

    def get(self, key: bytes) -> tuple[bool, bytes | None]:
        """``(True, pickled result)`` for a hit, ``(False, None)`` for a miss (a damaged
        large result counts as a miss, and is reported)."""
        loc = self.index.get(key)
        if loc is None:
            return False, None
        _, _, result, blob = self._entry(loc)
        if blob is None:
            return True, result
        return self._blob(key, blob)

    def get_many(self, keys: Iterable[bytes]) -> list[tuple[bool, bytes | None]]:
        """:meth:`get` of each key, in one pass."""
        index, decoded, out = self.index, self._decoded, []
        hit = out.append
        for key in keys:
            loc = index.get(key)
            if loc is None:
                hit((False, None))
                continue
            entries = decoded.get(loc >> 16)
            if entries is None:
                entries = self._decode(loc >> 16)
            _, _, result, blob = entries[loc & 0xFFFF]
            hit((True, result) if blob is None else self._blob(key, blob))
        return out

    def _blob(self, key: bytes, blob: str) -> tuple[bool, bytes | None]:
        try:
            data = (self.path / "blobs" / blob).read_bytes()
        except OSError:
            return False, None
        if hashlib.sha256(data).hexdigest() != blob:
            warnings.warn(f"result cache {self.path}: blob {blob} is damaged (its content does"
                          " not match its hash): its task is computed again", CacheWarning,
                          stacklevel=2)
            del self.index[key]
            return False, None
        return True, data

    # --- writing ---------------------------------------------------------------------------------
    def put(self, entries: Iterable[tuple[bytes, str, bytes | None]]) -> int:
        """Append ``(key, name, pickled result)`` entries (one record per batch); return how
        many. Not fsynced: a cache entry lost to a crash is computed again."""
        items = list(entries)
        for name in {nm for _, nm, _ in items}:
            self.add(name, [k for k, nm, _ in items if nm == name],
                     [r for _, nm, r in items if nm == name])
        return len(items)

    def add(self, name: str, keys: list[bytes], results: list[bytes | None]) -> None:
        """:meth:`put` of results of one function or program, ``results[i]`` under
        ``keys[i]``."""
        now = time.time()
        for at in range(0, len(keys), MAX_BATCH):
            part = results[at:at + MAX_BATCH]
            if max(map(len, filter(None, part)), default=0) <= BLOB_ABOVE:
                entries = list(zip(repeat(now), repeat(name), part, repeat(None)))
            else:
                entries = [(now, name, r, None) if r is None or len(r) <= BLOB_ABOVE
                           else (now, name, None, self._write_blob(r)) for r in part]
            self._append(keys[at:at + MAX_BATCH], _record(keys[at:at + MAX_BATCH], entries))

    def _append(self, keys: list[bytes], rec: bytes) -> None:
        writer = self._writer or self._open_writer()
        assert self._own is not None
        offset = writer.size + HEADER_SIZE
        writer.append([rec])
        self._index_record(self._own, offset, rec, keys)
        self._own.scanned = writer.size

    def _open_writer(self) -> JournalWriter:
        host = socket.gethostname().split(".")[0]
        name = f"{host}-{os.getpid()}-{secrets.token_hex(4)}.pack"
        self._writer = JournalWriter(self.path / "packs" / name, fsync=False)
        self._own = self._packs[name] = _Pack(self.path / "packs" / name)
        self._order.append(self._own)
        return self._writer

    def _write_blob(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        final = self.path / "blobs" / digest
        if not final.exists():
            tmp = final.with_name(f"{digest}.{secrets.token_hex(4)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        return digest

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._decoded.clear()
        for pack in self._order:
            if pack.map is not None:
                pack.map.close()
                pack.map = None

    def __enter__(self) -> ResultCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- looking and cleaning --------------------------------------------------------------------
    def entries(self) -> Iterator[Entry]:
        """Every live entry (the latest for each key), oldest record first."""
        for key, loc in sorted(self.index.items(), key=lambda kv: kv[1]):
            t, name, result, blob = self._entry(loc)
            size = len(result or b"") if blob is None else self._blob_size(blob)
            yield Entry(key, t, name, size, blob is not None)

    def _blob_size(self, blob: str) -> int:
        try:
            return (self.path / "blobs" / blob).stat().st_size
        except OSError:
            return 0

    def stats(self) -> Stats:
        """Counts and sizes (see :class:`Stats`)."""
        s = Stats(str(self.path), entries=len(self.index), packs=len(self._packs))
        for pack in self._packs.values():
            s.damaged_records += pack.damaged
            s.torn_bytes += pack.torn
            try:
                s.pack_bytes += pack.path.stat().st_size
            except OSError:
                pass
        for e in os.scandir(self.path / "blobs"):
            if e.is_file() and not e.name.endswith(".tmp"):
                s.blobs += 1
                s.blob_bytes += e.stat().st_size
        for e in self.entries():
            s.by_name[e.name] = s.by_name.get(e.name, 0) + 1
            s.oldest = e.written_at if s.oldest is None else min(s.oldest, e.written_at)
            s.newest = e.written_at if s.newest is None else max(s.newest, e.written_at)
        return s

    def clear(self, older_than: float | None = None, name: str | None = None) -> int:
        """Remove entries written more than ``older_than`` seconds ago and/or whose name is
        ``name`` (its last dotted part matches too); both None: everything. Returns how many
        were removed. The packs are rewritten without them (a new pack, then the old ones
        removed), and blobs no entry uses any more are deleted. Entries another process writes
        into an old pack while this runs may be dropped with it (they are computed again)."""
        cut = None if older_than is None else time.time() - older_than
        keep: list[tuple[bytes, float, str, bytes | None, str | None]] = []
        removed = 0
        for key, loc in sorted(self.index.items(), key=lambda kv: kv[1]):
            t, nm, result, blob = self._entry(loc)
            old = cut is None or t < cut
            named = name is None or nm == name or nm.rsplit(".", 1)[-1] == name
            if old and named:
                removed += 1
            else:
                keep.append((key, t, nm, result, blob))
        old_packs = [p for p in self._order]
        self.close()
        if keep:
            self._write_compacted(keep)
        for p in old_packs:
            p.path.unlink(missing_ok=True)
        used = {k[4] for k in keep if k[4] is not None}
        for e in os.scandir(self.path / "blobs"):
            if e.name not in used:
                os.unlink(e.path)
        self._packs, self._order, self.index, self._records = {}, [], {}, []
        self._decoded = {}
        self._own = None
        self.refresh()
        return removed

    def _write_compacted(self, keep: list[tuple[bytes, float, str, bytes | None, str | None]]
                         ) -> None:
        """Write ``keep`` into one new pack under a temporary name, then give it its name."""
        host = socket.gethostname().split(".")[0]
        final = self.path / "packs" / f"{host}-{os.getpid()}-{secrets.token_hex(4)}.pack"
        tmp = final.with_suffix(".tmp")
        recs = []
        for at in range(0, len(keep), MAX_BATCH):
            part = keep[at:at + MAX_BATCH]
            recs.append(_record([k for k, *_ in part], [(t, nm, r, b) for _, t, nm, r, b in part]))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(frame(recs))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)


def _record(keys: list[bytes], entries: list[EntryData]) -> bytes:
    """One record's payload: ``entries`` under ``keys`` (see the module doc)."""
    return b"".join([_HEAD.pack(_VERSION, len(keys)), *keys, _ENTRY.encode(entries)])


def _whole_frame(view: memoryview, pos: int, end: int) -> bool:
    """Whether a frame at ``pos`` has a header and all of its bytes (its checksum may still
    fail: then it is damaged, not being written)."""
    if end - pos < HEADER_SIZE:
        return False
    magic, n, _ = HEADER.unpack_from(view, pos)
    return magic == MAGIC and n <= MAX_RECORD and pos + HEADER_SIZE + n == end


def _next_frame(view: memoryview, start: int, end: int) -> int:
    """Where the next valid frame at or after ``start`` begins (-1: none): the record after
    a damaged one."""
    raw = view.obj if isinstance(view.obj, bytes) else bytes(view)
    pos = raw.find(MAGIC_BYTE, start)
    while 0 <= pos < end:
        if check_frame(view, pos, end)[0]:
            return pos
        pos = raw.find(MAGIC_BYTE, pos + 1)
    return -1


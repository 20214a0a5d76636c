"""Append-only journals: one file per array worker on a shared filesystem, of the typed
records the shared-filesystem protocol writes (:class:`Started`, :class:`Ended`,
:class:`Released`, :class:`Claimed`), framed as :mod:`pipefarm.framing` says (length and
checksum per record; a torn tail ignored by readers and repaired by its owner).
"""

from __future__ import annotations

import msgspec

# the framing, under the names the protocol's modules have always imported from here
from ..framing import (  # noqa: F401 - re-exported
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAGIC_BYTE,
    MAX_RECORD,
    JournalCorruptError,
    JournalRead,
    JournalWriter,
    ReadStatus,
    check_frame,
    frame,
    fsync_dir,
    read_journal,
    scan_frames,
)


# ------------------------------------------------------------------------------- typed records
class Started(msgspec.Struct, array_like=True, tag=1):
    """A worker began running a leased task."""

    task: int
    token: int
    attempt: int
    worker: str
    t: float


class Ended(msgspec.Struct, array_like=True, tag=2):
    """An attempt ended; mirrors :class:`pipefarm.task.Finished` plus a result file reference.

    ``outcome`` is a :class:`pipefarm.states.Outcome` value. A small result travels inline in
    ``result``; a large one is written to ``result_file`` (relative to the run directory)
    before this record is appended. ``output`` says where the attempt's stdout/stderr landed
    (the worker's log file and offsets).
    """

    task: int
    token: int
    attempt: int
    outcome: int
    started_at: float
    ended_at: float
    result: bytes | None = None
    result_file: str | None = None
    error: str | None = None
    exit_code: int | None = None
    note: str | None = None
    output: str | None = None
    peak_memory: int | None = None  # resident bytes at the attempt's peak


class Released(msgspec.Struct, array_like=True, tag=3):
    """A worker handed a lease back unstarted (or stopped by a known cause)."""

    task: int
    token: int


class Claimed(msgspec.Struct, array_like=True, tag=4):
    """A worker took claim ``<block>.<epoch>`` (the shared-filesystem protocol).

    ``tasks`` are the tasks it adopted (``None``: every task of the block, for epoch 0);
    ``lost`` the tasks whose previous attempt was in flight when the block was taken over.
    """

    block: int
    epoch: int
    worker: str
    t: float
    tasks: list[int] | None = None
    lost: list[int] = []


Record = Started | Ended | Released | Claimed

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Record)


def encode_record(record: Record) -> bytes:
    """msgpack bytes of one typed record (a tagged array: ``[tag, field, ...]``)."""
    return _encoder.encode(record)


def decode_record(data: bytes) -> Record:
    """Inverse of :func:`encode_record`; raises ``msgspec.DecodeError`` on bad input."""
    return _decoder.decode(data)

"""Framed append-only journals: round trips, torn tails, repair, damage, concurrency, cursors."""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import struct

import msgspec
import pytest

from pipefarm.store import journal as J
from pipefarm.store.journal import (
    HEADER_SIZE,
    Ended,
    JournalCorruptError,
    JournalWriter,
    Released,
    Started,
    decode_record,
    encode_record,
    read_journal,
)


def recs(n: int, start: int = 0) -> list[bytes]:
    # varied sizes, including empty payloads and bytes equal to the magic byte
    return [bytes([J.MAGIC]) * (i % 3) + f"record-{start + i}".encode() * (i % 5) for i in range(n)]


def write(path, batches: list[list[bytes]], **kw) -> None:
    with JournalWriter(path, **kw) as w:
        for b in batches:
            w.append(b)


def test_round_trip(tmp_path):
    p = tmp_path / "w.log"
    batches = [recs(3), recs(1, 3), [], recs(10, 4)]
    write(p, batches)
    got = read_journal(p)
    records, offset = got  # unpacks as a pair
    assert records == [r for b in batches for r in b]
    assert offset == os.path.getsize(p)
    assert got.status == "ok" and not got.corrupt and got.reason == ""
    assert oct(os.stat(p).st_mode & 0o777) == "0o600"


def test_frame_layout(tmp_path):
    data = J.frame([b"abc"])
    magic, n, crc = struct.unpack_from("<BII", data)
    assert (magic, n, len(data)) == (J.MAGIC, 3, HEADER_SIZE + 3)
    assert data[HEADER_SIZE:] == b"abc"


def test_missing_and_empty(tmp_path):
    assert read_journal(tmp_path / "nope.log") == ([], 0)
    p = tmp_path / "e.log"
    p.write_bytes(b"")
    got = read_journal(p)
    assert got == ([], 0) and got.status == "ok"
    assert read_journal(p, 0).records == []
    with pytest.raises(ValueError):
        read_journal(p, -1)


def test_shorter_than_header(tmp_path):
    p = tmp_path / "s.log"
    for k in range(1, HEADER_SIZE):
        p.write_bytes(J.frame([b"xyz"])[:k])
        got = read_journal(p)
        assert got == ([], 0) and got.status == "torn"


def test_length_past_eof(tmp_path):
    p = tmp_path / "l.log"
    good = J.frame([b"one", b"two"])
    bad = struct.pack("<BII", J.MAGIC, 1000, 0) + b"short"
    p.write_bytes(good + bad)
    got = read_journal(p)
    assert got.records == [b"one", b"two"] and got.offset == len(good)
    assert got.status == "torn"


def test_torn_tail_at_every_byte(tmp_path):
    """Cut the last record at every byte: the reader sees exactly the complete ones."""
    p = tmp_path / "t.log"
    head = recs(5)
    last = b"the-last-record" * 7
    write(p, [head, [last]])
    full = p.read_bytes()
    start_last = len(J.frame(head))
    assert len(full) == start_last + HEADER_SIZE + len(last)
    cut = tmp_path / "cut.log"
    for length in range(start_last, len(full)):
        cut.write_bytes(full[:length])
        got = read_journal(cut)
        assert got.records == head, length
        assert got.offset == start_last
        assert got.status == ("ok" if length == start_last else "torn")
        # and from a cursor inside the good part
        again = read_journal(cut, got.offset)
        assert again.records == [] and again.offset == start_last
    cut.write_bytes(full)
    assert read_journal(cut).records == head + [last]


def test_torn_tail_zero_filled_and_bad_crc_last(tmp_path):
    p = tmp_path / "z.log"
    write(p, [recs(4)])
    size = os.path.getsize(p)
    with open(p, "ab") as f:
        f.write(b"\0" * 4096)  # what a crash with delayed allocation can leave
    got = read_journal(p)
    assert got.records == recs(4) and got.offset == size and got.status == "torn"
    # a complete last frame whose checksum fails is a torn tail too
    p.write_bytes(J.frame(recs(4)) + J.frame([b"last"])[:-1] + b"X")
    got = read_journal(p)
    assert got.records == recs(4) and got.status == "torn"


def test_writer_reopen_repairs_then_appends(tmp_path):
    p = tmp_path / "r.log"
    write(p, [recs(3), recs(2, 3)])
    good = os.path.getsize(p)
    with open(p, "ab") as f:
        f.write(J.frame([b"torn-away-record"])[:-4])  # a crash mid-append
    assert read_journal(p).status == "torn"
    w = JournalWriter(p)
    assert w.repaired == HEADER_SIZE + len(b"torn-away-record") - 4
    assert w.size == good == os.path.getsize(p)
    w.append([b"new-1", b"new-2"])
    w.close()
    w.close()  # idempotent
    got = read_journal(p)
    assert got.records == recs(3) + recs(2, 3) + [b"new-1", b"new-2"]
    assert got.status == "ok" and got.offset == os.path.getsize(p)
    with pytest.raises(ValueError):
        w.append([b"x"])


def test_reopen_at_every_torn_length(tmp_path):
    p = tmp_path / "every.log"
    write(p, [recs(2)])
    base = p.read_bytes()
    tail = J.frame([b"0123456789"])
    for k in range(len(tail)):
        p.write_bytes(base + tail[:k])
        with JournalWriter(p, fsync=False) as w:
            assert w.size == len(base)
            w.append([b"after"])
        got = read_journal(p)
        assert got.records == recs(2) + [b"after"] and got.status == "ok", k


def test_crc_corruption_in_the_middle(tmp_path):
    p = tmp_path / "c.log"
    rs = [f"payload-{i}".encode() * 3 for i in range(10)]
    write(p, [rs[:4], rs[4:]])
    data = bytearray(p.read_bytes())
    start5 = len(J.frame(rs[:5]))
    data[start5 + HEADER_SIZE + 2] ^= 0xFF  # flip a payload byte of record 5
    p.write_bytes(bytes(data))
    got = read_journal(p)
    assert got.records == rs[:5] and got.offset == start5
    assert got.status == "corrupt" and got.corrupt and "checksum" in got.reason
    # a cursor past the damage still reads what follows
    start6 = len(J.frame(rs[:6]))
    assert read_journal(p, start6).records == rs[6:]
    # the owner refuses to bury the damage ...
    with pytest.raises(JournalCorruptError) as ei:
        JournalWriter(p)
    assert ei.value.offset == start5
    assert p.read_bytes() == bytes(data)  # untouched
    # ... unless told to cut there
    with JournalWriter(p, on_corrupt="truncate") as w:
        assert w.size == start5
        w.append([b"fresh"])
    assert read_journal(p).records == rs[:5] + [b"fresh"]


def test_garbage_in_the_middle(tmp_path):
    p = tmp_path / "g.log"
    a, b = J.frame([b"a1", b"a2"]), J.frame([b"b1"])
    p.write_bytes(a + b"\x07garbage-garbage" + b)
    got = read_journal(p)
    assert got.records == [b"a1", b"a2"] and got.offset == len(a)
    assert got.corrupt and "magic" in got.reason
    # a damaged length field: the checksum covers it, so it is caught
    d = bytearray(a + b)
    d[1] ^= 0x01  # first frame's length 2 -> 3
    p.write_bytes(bytes(d))
    got = read_journal(p)
    assert got.records == [] and got.corrupt


def test_append_failure_rolls_back(tmp_path, monkeypatch):
    p = tmp_path / "f.log"
    w = JournalWriter(p)
    w.append([b"kept"])
    size = w.size
    real_write = os.write

    def half_then_enospc(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_enospc)
    with pytest.raises(OSError):
        w.append([b"lost-1" * 10, b"lost-2" * 10])
    monkeypatch.setattr(os, "write", real_write)
    assert os.path.getsize(p) == size
    w.append([b"after"])
    w.close()
    got = read_journal(p)
    assert got.records == [b"kept", b"after"] and got.status == "ok"


def test_fsync_policies(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append(fd), raising=False)
    with JournalWriter(tmp_path / "a.log") as w:  # one sync per append call
        w.append(recs(100))
        w.append(recs(100))
    assert len(calls) == 2
    calls.clear()
    with JournalWriter(tmp_path / "b.log", fsync=False) as w:
        w.append(recs(10))
    assert calls == []
    with JournalWriter(tmp_path / "c.log", fsync_interval=3600) as w:
        for _ in range(50):
            w.append(recs(2))
        assert len(calls) == 1  # the first; the rest wait for the interval, sync() or close()
    assert len(calls) == 2


def test_typed_records_round_trip():
    rs = [
        Started(task=7, token=123456789, attempt=1, worker="host-1-abc", t=1.5),
        Ended(7, 123456789, 1, 0, 1.5, 2.5, result=b"\x80\x05K.", exit_code=0),
        Ended(
            8,
            5,
            2,
            1,
            1.0,
            2.0,
            result_file="results/8.bin",
            error="boom",
            note="n",
            output="logs/w.out:0:120",
        ),
        Released(task=9, token=42),
    ]
    for r in rs:
        assert decode_record(encode_record(r)) == r
    assert isinstance(decode_record(encode_record(rs[3])), Released)
    assert msgspec.msgpack.decode(encode_record(rs[3])) == [3, 9, 42]  # compact: tagged array
    with pytest.raises(msgspec.DecodeError):
        decode_record(b"\x93\x09\x01\x02")


def test_typed_records_in_a_journal(tmp_path):
    p = tmp_path / "typed.log"
    rs = [Started(i, i * 10, 1, "w", float(i)) for i in range(5)] + [Released(1, 10)]
    write(p, [[encode_record(r) for r in rs]])
    assert [decode_record(b) for b in read_journal(p).records] == rs


def test_cursor_reads_are_incremental_and_idempotent(tmp_path):
    p = tmp_path / "cur.log"
    w = JournalWriter(p, fsync=False)
    folded: dict[bytes, int] = {}
    seen: list[bytes] = []
    cursor = 0

    def fold(records):
        for r in records:
            folded[r] = folded.get(r, 0) + 1  # a fold is a set-like upsert

    expected: list[bytes] = []
    history = [0]
    for i in range(20):
        batch = recs(i % 4, 100 * i)
        w.append(batch)
        expected += batch
        records, cursor = read_journal(p, cursor)
        seen += records
        fold(records)
        history.append(cursor)
        # re-reading at the same cursor yields nothing and leaves it where it is
        assert read_journal(p, cursor) == ([], cursor)
    w.close()
    assert seen == expected
    # replaying from any older cursor gives exactly the suffix; folding it again changes nothing
    before = dict(folded)
    for old in history:
        records, end = read_journal(p, old)
        assert end == cursor
        assert records == expected[len(read_journal(p).records) - len(records) :]
        for r in records:
            folded[r] = max(folded[r], 1)
    assert folded.keys() == before.keys()


def _writer_proc(path: str, wid: int, batches: int) -> None:
    with JournalWriter(path, fsync=False) as w:
        for b in range(batches):
            w.append([f"{wid}:{b}:{k}".encode() * (1 + k % 7) for k in range(1 + b % 5)])


def _expected(wid: int, batches: int) -> list[bytes]:
    return [
        f"{wid}:{b}:{k}".encode() * (1 + k % 7) for b in range(batches) for k in range(1 + b % 5)
    ]


@pytest.mark.slow
def test_concurrent_writers_and_a_tailing_reader(tmp_path):
    """4 processes append to 4 journals while this process tails them by cursor."""
    batches = 400
    paths = [str(tmp_path / f"w{i}.log") for i in range(4)]
    ctx = mp.get_context("spawn")  # no inherited state: like separate hosts' workers
    procs = [ctx.Process(target=_writer_proc, args=(p, i, batches)) for i, p in enumerate(paths)]
    for pr in procs:
        pr.start()
    cursors = dict.fromkeys(paths, 0)
    got: dict[str, list[bytes]] = {p: [] for p in paths}
    while any(pr.is_alive() for pr in procs):
        for p in paths:
            r = read_journal(p, cursors[p])
            assert not r.corrupt, r  # a live writer's partial frame reads as torn, never corrupt
            got[p] += r.records
            cursors[p] = r.offset
    for pr in procs:
        pr.join(30)
        assert pr.exitcode == 0
    for i, p in enumerate(paths):
        r = read_journal(p, cursors[p])
        got[p] += r.records
        assert r.status == "ok"
        assert got[p] == _expected(i, batches)
        assert read_journal(p).records == got[p]

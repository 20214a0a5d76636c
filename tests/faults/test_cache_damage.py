"""A damaged cache entry is never served: it is skipped, reported and computed again.

Real cache files, damaged on disk the way disks and crashes damage them: a flipped byte inside
a record, a record cut short at the end of its pack (a writer that died mid-append).
"""

from __future__ import annotations

import os
import sqlite3
import time
import warnings
from pathlib import Path

import pytest

import pipefarm as pf
from pipefarm.cache.entries import TORN_AFTER_S, ResultCache
from pipefarm.store.journal import HEADER_SIZE, read_journal


def logged(x):
    with open(os.environ["CACHE_TEST_LOG"], "a") as f:
        f.write(f"{x}\n")
    return x * 10


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CACHE_TEST_LOG", str(tmp_path / "log"))
    monkeypatch.setenv("PIPEFARM_CACHE", str(tmp_path / "cache"))
    return tmp_path


def sweep(env: Path, name: str) -> pf.Run:
    """Five tasks on the sequential backend: each success is a record of its own."""
    run = pf.Run.create(env / name)
    run.map(logged, range(5), cache=True)
    run.execute(backend="sequential", progress=False)
    return run


def computed(env: Path) -> list[int]:
    return [int(x) for x in (env / "log").read_text().split()]


def outcome_of(run: pf.Run) -> list[str]:
    db = sqlite3.connect(run.path / "catalog.db")
    try:
        return [pf.Outcome(o).label for (o,) in db.execute("SELECT outcome FROM tasks ORDER BY id")]
    finally:
        db.close()


def the_pack(env: Path) -> tuple[Path, list[int]]:
    """The one pack file and where each of its records' payloads starts."""
    (pack,) = (env / "cache" / "packs").glob("*.pack")
    starts, at = [], 0
    for rec in read_journal(pack).records:
        starts.append(at + HEADER_SIZE)
        at += HEADER_SIZE + len(rec)
    return pack, starts


def test_a_flipped_byte_costs_that_entry_only_and_is_reported(env: Path) -> None:
    sweep(env, "a")
    pack, starts = the_pack(env)
    assert len(starts) == 5
    data = bytearray(pack.read_bytes())
    data[starts[2] + 20] ^= 0x40  # inside the third task's key
    pack.write_bytes(bytes(data))

    with pytest.warns(pf.cache.CacheWarning, match="1 damaged record"):
        run = sweep(env, "b")
    assert computed(env) == [0, 1, 2, 3, 4, 2], "only the damaged entry is computed again"
    assert outcome_of(run) == ["cached", "cached", "succeeded", "cached", "cached"]
    assert [run.result(t) for t in range(1, 6)] == [0, 10, 20, 30, 40]
    with ResultCache(env / "cache") as c, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c.refresh()
        s = c.stats()
    assert s.damaged_records == 1 and s.entries == 5


def test_a_record_cut_short_is_computed_again_and_reported(env: Path) -> None:
    sweep(env, "a")
    pack, starts = the_pack(env)
    size = pack.stat().st_size
    with open(pack, "r+b") as f:  # the last record loses its tail, as when a writer dies
        f.truncate(starts[4] + 10)
    old = time.time() - TORN_AFTER_S - 60
    os.utime(pack, (old, old))

    with pytest.warns(pf.cache.CacheWarning, match="incomplete record"):
        run = sweep(env, "b")
    assert computed(env) == [0, 1, 2, 3, 4, 4]
    assert outcome_of(run) == ["cached"] * 4 + ["succeeded"]
    with ResultCache(env / "cache") as c, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = c.stats()
    assert 0 < s.torn_bytes < size and s.entries == 5


def test_a_pack_being_written_is_not_called_damaged(env: Path) -> None:
    """An incomplete record younger than TORN_AFTER_S may be a live writer's append."""
    sweep(env, "a")
    pack, starts = the_pack(env)
    with open(pack, "r+b") as f:
        f.truncate(starts[4] + 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pf.cache.CacheWarning)
        with ResultCache(env / "cache") as c:
            assert len(c.index) == 4


def test_a_damaged_last_record_is_damage_at_once(env: Path) -> None:
    """A whole record whose checksum fails is damage, even at the end of a fresh pack (only a
    record that runs past the end may be a write in progress)."""
    sweep(env, "a")
    pack, starts = the_pack(env)
    data = bytearray(pack.read_bytes())
    data[starts[4] + 3] ^= 0x01
    pack.write_bytes(bytes(data))
    with pytest.warns(pf.cache.CacheWarning, match="1 damaged record"):
        with ResultCache(env / "cache") as c:
            assert len(c.index) == 4 and c.stats().torn_bytes == 0

"""Exporting: ready tasks become immutable blocks, offered to workers in waves.

Exporting (:func:`export`) moves ready tasks that are in no block into new blocks, in claim
order (priority, cost, id), grouped by resource class, sized by :func:`plan_blocks` from the
task count, the workers and the tasks' ``cost`` (read as estimated seconds): about eight blocks
per worker, at least :data:`CHEAP_MIN_BLOCK` cheap tasks per block, down to one task per block
for long tasks or when there are few. The catalog
rows are committed first, then the spec and block files are written, then ``fs/wave``; blocks
whose files were never written (a crash in between) are written by the next export before
anything else. Dependent tasks become ready as the fold records their dependencies' success,
and go out in a later wave.

The block sizes are the tunables below, each with the measurement that chose it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import msgspec

from ...states import State
from ...task import Resources
from ..journal import fsync_dir
from ..sqlite import SQLiteStore
from .layout import CHILD_BASE, BlockFile, Layout, Wave
from .primitives import write_atomic
from .tables import chunks, ensure_schema, qs


def pick_ready(catalog: SQLiteStore, n: int | None, resources: Resources | None,
               now: float) -> list[int]:
    """Ready tasks in no block, claimable at ``now``, in claim order (at most ``n``)."""
    fit, params = "", [now]
    if resources is not None:
        fit = " AND t.spec IN (SELECT id FROM specs WHERE cpus <= ? AND gpus <= ?)"
        params += [resources.cpus, resources.gpus]
    lim = ""
    if n is not None:
        lim = " LIMIT ?"
        params.append(n)
    return [
        t for (t,) in catalog.db.execute(
            f"SELECT t.id FROM tasks t WHERE t.state={int(State.READY)}"
            " AND (t.ready_at IS NULL OR t.ready_at <= ?)"
            f" AND NOT EXISTS (SELECT 1 FROM fs_export e WHERE e.task = t.id){fit}"
            f" ORDER BY t.priority DESC, t.cost DESC, t.id{lim}",
            params,
        )
    ]


def _write_specs(layout: Layout, catalog: SQLiteStore, sids: Iterable[int]) -> None:
    db = catalog.db
    for sid in sorted(set(sids)):
        if db.execute("SELECT 1 FROM fs_specs WHERE id=?", (sid,)).fetchone():
            continue
        write_atomic(layout.spec(sid), msgspec.msgpack.encode(catalog.spec(sid)))
        db.execute("INSERT OR IGNORE INTO fs_specs(id) VALUES (?)", (sid,))


def _block_rows(db, ids: Sequence[int]) -> list[tuple]:
    rows: dict[int, tuple] = {}
    for chunk in chunks(list(ids)):
        for r in db.execute(
            "SELECT t.id, t.spec, t.args, t.attempt, t.lost, s.cpus, s.gpus FROM tasks t"
            f" JOIN specs s ON s.id = t.spec WHERE t.id IN ({qs(len(chunk))})",
            chunk,
        ):
            rows[r[0]] = r
    return [rows[t] for t in ids if t in rows]


def _time_requests(catalog: SQLiteStore, sids: Iterable[int]) -> dict[int, float]:
    """The ``time_request`` of each spec among ``sids`` that has one."""
    out = {}
    for sid in set(sids):
        need = catalog.spec(sid).time_request
        if need:
            out[sid] = float(need)
    return out


def _new_blocks(layout: Layout, catalog: SQLiteStore, groups: list[list[tuple]], now: float,
                wave: int | None) -> list[tuple[int, BlockFile]]:
    """Insert catalog rows for blocks of ``groups`` (rows of :func:`_block_rows`, each group
    of one resource and time class)."""
    db = catalog.db
    needs = _time_requests(catalog, {rows[0][1] for rows in groups})
    first = (db.execute("SELECT max(id) FROM fs_blocks WHERE id < ?",
                        (CHILD_BASE,)).fetchone()[0] or 0) + 1
    out = []
    for i, rows in enumerate(groups):
        b = first + i
        cpus, gpus = rows[0][5], rows[0][6]
        bf = BlockFile(b, cpus, gpus, [(r[0], r[1], r[2], r[3], r[4]) for r in rows])
        out.append((b, bf))
    db.executemany(
        "INSERT INTO fs_blocks(id, n, cpus, gpus, wave, created) VALUES (?,?,?,?,?,?)",
        [(b, len(bf.entries), bf.cpus, bf.gpus, wave, now) for b, bf in out],
    )
    db.executemany(
        "INSERT OR REPLACE INTO fs_block_time(id, need_s) VALUES (?, ?)",
        [(b, needs[bf.entries[0][1]]) for b, bf in out if bf.entries[0][1] in needs],
    )
    db.executemany(
        "INSERT INTO fs_export(task, block) VALUES (?, ?)",
        [(e[0], b) for b, bf in out for e in bf.entries],
    )
    return out


def write_block(layout: Layout, bf: BlockFile, fsync: bool = True) -> None:
    write_atomic(layout.block(bf.block), msgspec.msgpack.encode(bf), fsync=fsync)


def export_block(layout: Layout, catalog: SQLiteStore, ids: Sequence[int], now: float) -> int:
    """One block of exactly ``ids`` (in that order), written at once; its id. Call inside a
    catalog transaction (the store's ``claim``)."""
    rows = _block_rows(catalog.db, ids)
    _write_specs(layout, catalog, {r[1] for r in rows})
    ((b, bf),) = _new_blocks(layout, catalog, [rows], now, None)
    write_block(layout, bf, fsync=False)
    catalog.db.execute("UPDATE fs_blocks SET written=1 WHERE id=?", (b,))
    return b


#: Blocks per worker a wave aims at: each worker claims about this many, so the last ones to
#: finish are small next to the whole, and claims stay far below one metadata op per task.
BLOCKS_PER_WORKER = 8
#: Fewest tasks in a block of cheap tasks, or of tasks of unknown cost. A block costs its worker
#: ~8 run-directory metadata operations (a readdir of claims/, the claim's create, the block
#: file's open, the journal's Claimed append and fsync, the done marker, ...); measured with
#: W7 (100,000 no-op tasks, 8 workers, 64 blocks of ~1,560 and a tail of blocks shrinking to
#: this size): 0.015 operations per task, a third of the 0.05 budget.
CHEAP_MIN_BLOCK = 16
#: The least estimated work (``cost`` read as seconds) worth a block of its own: a block's
#: ~8 metadata operations take ~10 ms on an NFS server that answers in ~1 ms, 1 % of 1 s.
#: Costlier tasks go down to one per block.
MIN_BLOCK_S = 1.0


def min_block_for(n: int, workers: int, mean_cost: float | None = None) -> int:
    """Fewest tasks per block for ``n`` tasks on ``workers``: :data:`CHEAP_MIN_BLOCK`, fewer
    for tasks whose mean ``cost`` (seconds) makes :data:`MIN_BLOCK_S` with fewer, and never so
    many that some workers get no block (``n / (workers * BLOCKS_PER_WORKER)``), down to 1."""
    floor = CHEAP_MIN_BLOCK
    if mean_cost:
        floor = min(floor, math.ceil(MIN_BLOCK_S / mean_cost))
    return max(1, min(floor, n // (max(1, workers) * BLOCKS_PER_WORKER)))


def plan_blocks(weights: Sequence[float], workers: int, min_block: int | None = None,
                max_block: int = 4096, *, mean_cost: float | None = None) -> list[int]:
    """Block sizes for tasks of these weights (costs), in order.

    A block targets ``total / (workers * BLOCKS_PER_WORKER)`` of the weight, so that each
    worker takes about eight blocks (claims stay far below one metadata operation per task),
    between ``min_block`` (default: :func:`min_block_for` the task count, the workers and
    ``mean_cost``, the tasks' mean estimated seconds or None) and ``max_block`` tasks. The tail
    is balanced: once less than a quarter is left, blocks shrink to
    ``remaining / (2 * workers)``, down to ``min_block``; workers also split the tails of
    each other's blocks as they run (see :mod:`.claimant`).
    """
    n = len(weights)
    total = float(sum(weights))
    workers = max(1, workers)
    if min_block is None:
        min_block = min_block_for(n, workers, mean_cost)
    target = total / (workers * BLOCKS_PER_WORKER)
    sizes: list[int] = []
    i, remaining = 0, total
    while i < n:
        cap = min(target, remaining / (2 * workers))
        acc, j = 0.0, i
        while j < n and j - i < max_block and (j - i < min_block or acc < cap):
            acc += weights[j]
            j += 1
        sizes.append(j - i)
        remaining -= acc
        i = j
    return sizes


@dataclass
class ExportStats:
    blocks: int = 0
    tasks: int = 0
    repaired: int = 0  # blocks whose files an earlier export had not written
    final: bool = False
    wave: int = 0
    first: int = 0  # ids of the new blocks: first..last
    last: int = 0


def export(
    layout: Layout,
    catalog: SQLiteStore,
    *,
    workers: int = 8,
    now: float | None = None,
    min_block: int | None = None,
    max_block: int = 4096,
    limit: int | None = None,
) -> ExportStats:
    """One wave: every ready task in no block becomes part of a new block; ``fs/wave`` is
    rewritten (``final`` when nothing is blocked or waiting for its backoff)."""
    ensure_schema(catalog)
    now = time.time() if now is None else now
    stats = ExportStats()
    db = catalog.db
    stats.repaired = _repair_unwritten(layout, catalog)
    with catalog.transaction():
        ids = pick_ready(catalog, limit, None, now)
        seq = int(catalog.meta("fs_wave", 0) or 0) + 1
        made: list[tuple[int, BlockFile]] = []
        if ids:
            rows = _block_rows(db, ids)
            # one class per resources and time asked for: a block is claimed whole, by a
            # worker that has the resources and the time for every task in it
            needs = _time_requests(catalog, {r[1] for r in rows})
            by_class: dict[tuple[int, int, float], list[tuple]] = {}
            for r in rows:
                by_class.setdefault((r[5], r[6], needs.get(r[1], 0.0)), []).append(r)
            costs = dict(_cost_rows(db, ids))
            known = [c for c in costs.values() if c > 0]
            mean_cost = sum(known) / len(known) if known else None
            groups: list[list[tuple]] = []
            for rows_c in by_class.values():
                weights = [costs.get(r[0], 0.0) or mean_cost or 1.0 for r in rows_c]
                k = 0
                for size in plan_blocks(weights, workers, min_block, max_block,
                                        mean_cost=mean_cost):
                    groups.append(rows_c[k : k + size])
                    k += size
            rank = {t: i for i, t in enumerate(ids)}
            groups.sort(key=lambda g: rank[g[0][0]])
            _write_specs(layout, catalog, {r[1] for r in rows})
            made = _new_blocks(layout, catalog, groups, now, seq)
        catalog.set_meta("fs_wave", seq)
    for _, bf in made:
        write_block(layout, bf)
    if made:
        fsync_dir(layout.blocks)
        with catalog.transaction():
            db.execute("UPDATE fs_blocks SET written=1 WHERE id BETWEEN ? AND ?",
                       (made[0][0], made[-1][0]))
        stats.first, stats.last = made[0][0], made[-1][0]
    stats.blocks = len(made)
    stats.tasks = sum(len(bf.entries) for _, bf in made)
    stats.wave = seq
    stats.final = _write_wave(layout, catalog, seq)
    return stats


def _cost_rows(db, ids: Sequence[int]) -> list[tuple[int, float]]:
    out = []
    for chunk in chunks(list(ids)):
        out += db.execute(f"SELECT id, cost FROM tasks WHERE id IN ({qs(len(chunk))})",
                          chunk).fetchall()
    return out


def _write_wave(layout: Layout, catalog: SQLiteStore, seq: int) -> bool:
    db = catalog.db
    top = db.execute("SELECT max(id) FROM fs_blocks WHERE written=1 AND id < ?",
                     (CHILD_BASE,)).fetchone()[0] or 0
    pending = db.execute(
        f"SELECT 1 FROM tasks t WHERE t.state={int(State.BLOCKED)} OR (t.state={int(State.READY)}"
        " AND NOT EXISTS (SELECT 1 FROM fs_export e WHERE e.task=t.id)) LIMIT 1"
    ).fetchone()
    classes: list[tuple[int, int, int, int]] = []
    for b, cpus, gpus in db.execute(
        "SELECT id, cpus, gpus FROM fs_blocks WHERE (cpus > 1 OR gpus > 0) AND id < ? ORDER BY id",
        (CHILD_BASE,),
    ):
        if classes and classes[-1][1] == b - 1 and classes[-1][2:] == (cpus, gpus):
            classes[-1] = (classes[-1][0], b, cpus, gpus)
        else:
            classes.append((b, b, cpus, gpus))
    times: list[tuple[int, int, float]] = []
    for b, need in db.execute("SELECT id, need_s FROM fs_block_time WHERE id < ? ORDER BY id",
                              (CHILD_BASE,)):
        if times and times[-1][1] == b - 1 and times[-1][2] == need:
            times[-1] = (times[-1][0], b, need)
        else:
            times.append((b, b, need))
    final = pending is None
    write_atomic(layout.wave, msgspec.msgpack.encode(Wave(top, final, seq, classes, times)))
    return final


def _repair_unwritten(layout: Layout, catalog: SQLiteStore) -> int:
    """Write the files of blocks committed to the catalog by an export that then crashed."""
    db = catalog.db
    todo = [r for r in db.execute(
        "SELECT id, cpus, gpus FROM fs_blocks WHERE written=0 AND closed=0")]
    n = 0
    for b, cpus, gpus in todo:
        if not os.path.exists(layout.block(b)):
            ids = [t for (t,) in db.execute(
                "SELECT e.task FROM fs_export e JOIN tasks t ON t.id = e.task WHERE e.block=?"
                " ORDER BY t.priority DESC, t.cost DESC, t.id", (b,))]
            rows = _block_rows(db, ids)
            with catalog.transaction():
                _write_specs(layout, catalog, {r[1] for r in rows})
            write_block(layout, BlockFile(b, cpus, gpus,
                                           [(r[0], r[1], r[2], r[3], r[4]) for r in rows]))
            n += 1
        with catalog.transaction():
            db.execute("UPDATE fs_blocks SET written=1 WHERE id=?", (b,))
    return n


def unexport(catalog: SQLiteStore, tasks: Sequence[int]) -> None:
    """Ready tasks among ``tasks`` leave their blocks: handed back to the catalog, claimable
    there at once (a store's ``release``). Call inside a catalog transaction."""
    catalog.db.executemany(
        "DELETE FROM fs_export WHERE task=?"
        f" AND (SELECT state FROM tasks WHERE id=?)={int(State.READY)}",
        [(t, t) for t in tasks],
    )

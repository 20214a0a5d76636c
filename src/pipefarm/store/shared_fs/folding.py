"""Folding: bring the catalog up to date with every worker's journal, idempotently.

Only the process that holds the catalog (``RUN/catalog.db``) folds; workers never open the
catalog (see :mod:`.claimant` for the worker side). The fold keeps its own bookkeeping in the
tables of :mod:`.tables`; it changes ``tasks`` and ``attempts`` only through the
:class:`~pipefarm.store.sqlite.SQLiteStore`'s own methods (its compare-and-set on tokens).

Folding (:func:`fold`) reads every journal from its cursor (a torn tail stops the read there;
its owner truncates it when it reopens), decodes the records and applies them in one
transaction, through the SQLite store's own methods (``finish``, ``release``,
``claim_with_tokens``, ``mark_running``, ``set_result_files``), which move a task only from the
states :mod:`pipefarm.states` allows:

1. :class:`~pipefarm.store.journal.Claimed` records of the pass first, in ``(block, epoch)`` order: the
   earlier holder's attempt of each adopted task ends (``lost`` when the claimant saw it
   started, released otherwise), then the task is claimed with the new token. Applying claims
   first makes a zombie's late ``Ended`` in the same pass stale.
2. ``Started``: claimed -> running where the token matches.
3. ``Ended``, per journal, through ``SQLiteStore.finish`` (compare-and-set on the token; a
   mismatch becomes a ``stale`` attempt). Large results arrive as files (``result_file``). A
   repeated report of an end already committed under the same token is dropped (it would
   otherwise count twice, and release the task's dependents twice).
4. ``Released``, per journal, through ``SQLiteStore.release`` (no budget spent).

Across passes the catalog is the serialisation point: a zombie's ``Ended`` folded *before* the
takeover's ``Claimed`` is visible is the task's result, and the takeover's later result of the
same task is recorded as stale. Either way exactly one result is kept and never overwritten.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec

from ... import states
from ...states import Outcome, State
from ...task import Finished
from ..journal import Claimed, Ended, Released, Started, read_journal
from ..sqlite import SQLiteStore
from .foldlock import FoldLock
from .layout import BlockFile, Cut, Layout, is_child, new_worker_id
from .primitives import create_excl, decode, split_token, token_of
from .tables import chunks, ensure_schema, qs


@dataclass
class FoldStats:
    """What one :func:`fold` did. ``ended`` counts ends that took effect (token matched)."""

    journals: int = 0
    records: int = 0
    bytes: int = 0
    claimed: int = 0  # tasks claimed by Claimed records
    started: int = 0
    ended: int = 0
    stale: int = 0
    released: int = 0
    lost: int = 0  # in-flight attempts ended as lost by a takeover
    unknown: int = 0  # records that could not be decoded or name an unknown block
    closed: int = 0  # blocks with nothing left in them
    splits: int = 0  # child blocks (made by splits) that this pass learnt of
    torn: list[str] = field(default_factory=list)  # journals whose tail is (for now) torn
    corrupt: list[str] = field(default_factory=list)  # journals damaged before their tail
    skipped: bool = False  # another process holds the fold lock: nothing done


def fold(
    run_dir: str | os.PathLike[str],
    catalog: SQLiteStore,
    *,
    now: float | None = None,
    lock: FoldLock | None = None,
    wait: float = 30.0,
    holder: str | None = None,
) -> FoldStats:
    """Bring ``catalog`` up to date with every journal of ``run_dir``; idempotent.

    Takes the fold lock for the call unless ``lock`` (already held, e.g. by a store) is given;
    when another process holds it past ``wait`` seconds, returns ``FoldStats(skipped=True)``.
    ``now`` is the catalog's clock for backoff (``ready_at``); records carry their own times.
    """
    layout = Layout(run_dir)
    ensure_schema(catalog)
    own = lock is None
    if own:
        lease = float(getattr(catalog, "lease_s", 60.0))
        lock = FoldLock(layout, holder or new_worker_id("fold-"), lease)
        if not lock.acquire(wait):
            return FoldStats(skipped=True)
    try:
        if not lock.refresh():
            return FoldStats(skipped=True)
        return _fold_locked(layout, catalog, time.time() if now is None else now)
    finally:
        if own:
            lock.release()


def _fold_locked(layout: Layout, catalog: SQLiteStore, now: float) -> FoldStats:
    stats = FoldStats()
    try:
        names = sorted(n for n in os.listdir(layout.journal) if n.endswith(".log"))
    except FileNotFoundError:
        return stats
    with catalog.transaction():
        db = catalog.db
        cursors = dict(db.execute("SELECT journal, offset FROM fs_cursors").fetchall())
        batch: list[tuple[str, object]] = []
        moved: list[tuple[str, int]] = []
        for name in names:
            start = cursors.get(name, 0)
            jr = read_journal(os.path.join(layout.journal, name), start)
            stats.journals += 1
            if jr.status == "torn":
                stats.torn.append(name)
            elif jr.status == "corrupt":
                stats.corrupt.append(name)
            if jr.offset == start:
                continue
            worker = name[:-4]
            for raw in jr.records:
                try:
                    batch.append((worker, decode(raw)))
                except msgspec.DecodeError:
                    stats.unknown += 1
            stats.bytes += jr.offset - start
            moved.append((name, jr.offset))
        stats.records = len(batch)
        if batch:
            _apply(layout, catalog, batch, now, stats)
        if moved:
            db.executemany(
                "INSERT INTO fs_cursors(journal, offset) VALUES (?, ?)"
                " ON CONFLICT(journal) DO UPDATE SET offset=excluded.offset",
                moved,
            )
    return stats


def _apply(layout: Layout, catalog: SQLiteStore, batch: list, now: float, stats: FoldStats) -> None:
    db = catalog.db
    touched: set[int] = set()
    claims = sorted(
        ((rec.block, rec.epoch, i, w, rec) for i, (w, rec) in enumerate(batch)
         if isinstance(rec, Claimed)),
        key=lambda x: x[:3],
    )
    for b, _, _, w, rec in claims:
        _apply_claimed(layout, catalog, rec, w, now, stats)
        touched.add(b)
        if is_child(b):  # its tasks left the parent: that may have emptied it
            touched.update(ancestors(db, b))
    # a start whose end is in the same pass needs no write: the end moves the task from
    # claimed straight to its outcome (and carries the start time)
    ends = {(rec.task, rec.token) for _, rec in batch if isinstance(rec, Ended)}
    started = [(rec.task, rec.token, rec.t) for _, rec in batch
               if isinstance(rec, Started) and (rec.task, rec.token) not in ends]
    stats.started += sum(isinstance(rec, Started) for _, rec in batch) - len(started)
    if started:
        stats.started += catalog.mark_running(started)
    ended: dict[str, list[Ended]] = {}
    released: dict[str, list[Released]] = {}
    for w, rec in batch:
        if isinstance(rec, Ended):
            ended.setdefault(w, []).append(rec)
        elif isinstance(rec, Released):
            released.setdefault(w, []).append(rec)
    for w, recs in ended.items():
        touched.update(_apply_ended(catalog, w, recs, now, stats))
    for w, recs in released.items():
        stats.released += catalog.release(w, [(r.task, r.token) for r in recs], now=now)
    _close_settled(layout, catalog, touched, stats)


def _current(db, ids: Iterable[int]) -> dict[int, tuple]:
    out: dict[int, tuple] = {}
    for chunk in chunks(sorted(set(ids))):
        for r in db.execute(
            f"SELECT id, state, token, worker, started_at FROM tasks WHERE id IN ({qs(len(chunk))})",
            chunk,
        ):
            out[r[0]] = r[1:]
    return out


def lose(catalog: SQLiteStore, task: int, row: tuple, now: float, why: str) -> None:
    """End the attempt held in ``row`` (state, token, worker, started_at) as lost."""
    _, token, worker, started_at = row
    catalog.finish(
        worker or "?",
        [Finished(task, token, int(Outcome.LOST), started_at if started_at is not None else now,
                  now, error=why)],
        now=now,
    )


def _end_held(catalog: SQLiteStore, task: int, row: tuple, worker: str, now: float,
              why: str) -> None:
    """End a lease held in ``row`` (state, token, worker, started_at): released when it never
    started, lost when it did."""
    if row[0] == State.CLAIMED:
        catalog.release(row[2] or worker, [(task, row[1])], now=now)
    else:
        lose(catalog, task, row, now, why)


def ancestors(db, block: int) -> set[int]:
    """The blocks ``block`` was split from, transitively (empty for an exported block)."""
    out: set[int] = set()
    while is_child(block):
        row = db.execute("SELECT parent FROM fs_children WHERE id=?", (block,)).fetchone()
        if row is None or row[0] in out:
            break
        block = row[0]
        out.add(block)
    return out


def register_child(layout: Layout, catalog: SQLiteStore, block: int, now: float,
                   stats: FoldStats | None = None) -> bool:
    """Learn of the child block ``block`` a split made (its file says where from): a catalog
    row for it, and its tasks move out of the parent's export into it. Only for children whose
    cut is known to be agreed (a worker claimed it, or a seal read the cut). False when its
    file is missing."""
    db = catalog.db
    if db.execute("SELECT 1 FROM fs_blocks WHERE id=?", (block,)).fetchone():
        return True
    try:
        with open(layout.block(block), "rb") as fh:
            bf = msgspec.msgpack.decode(fh.read(), type=BlockFile)
    except (OSError, msgspec.DecodeError):
        return False
    if is_child(bf.parent):
        register_child(layout, catalog, bf.parent, now, stats)
    db.execute(
        "INSERT OR IGNORE INTO fs_children(id, parent, parent_epoch, cut) VALUES (?,?,?,?)",
        (block, bf.parent, bf.parent_epoch, bf.cut),
    )
    db.execute(
        "INSERT INTO fs_blocks(id, n, cpus, gpus, written, wave, created) VALUES (?,?,?,?,1,NULL,?)",
        (block, len(bf.entries), bf.cpus, bf.gpus, now),
    )
    tasks = [x[0] for x in bf.entries]
    for chunk in chunks(tasks):
        db.execute(
            f"UPDATE fs_export SET block=? WHERE block=? AND task IN ({qs(len(chunk))})",
            [block, bf.parent, *chunk],
        )
    if stats is not None:
        stats.splits += 1
    return True


def register_cuts(layout: Layout, catalog: SQLiteStore, cuts: list[Cut], now: float
                   ) -> list[int]:
    """Register the children of agreed cuts (from :func:`~.claims.seal_cuts`)."""
    out = []
    for cut in cuts:
        if register_child(layout, catalog, cut.child, now):
            out.append(cut.child)
    return out


def _apply_claimed(layout: Layout, catalog: SQLiteStore, rec: Claimed, worker: str,
                   now: float, stats: FoldStats) -> None:
    db = catalog.db
    b, e = rec.block, rec.epoch
    row = db.execute("SELECT epoch FROM fs_blocks WHERE id=?", (b,)).fetchone()
    if row is None and is_child(b) and register_child(layout, catalog, b, now, stats):
        row = (-1,)  # a split's child, first heard of
    if row is None:
        stats.unknown += 1  # a block this catalog never exported
        return
    if e < row[0]:
        return  # superseded before it was folded (a newer epoch or a fence is known)
    if e > row[0]:
        db.execute("UPDATE fs_blocks SET epoch=?, holder=? WHERE id=?", (e, worker, b))
    if rec.tasks is None:
        tasks = [t for (t,) in db.execute("SELECT task FROM fs_export WHERE block=?", (b,))]
    else:
        tasks = list(rec.tasks)
    above = ancestors(db, b)
    if e > 0 or above:
        lost = set(rec.lost)
        for t, cur in _current(db, set(tasks) | lost).items():
            state, tok = cur[0], cur[1]
            if state not in states.ACTIVE or tok is None:
                continue
            tb, te = split_token(tok, t)
            if tb in above:  # claimed in the block it was split from, never started there
                _end_held(catalog, t, cur, worker, now,
                          f"lost: running in block {tb} when it was split off to block {b}")
                continue
            if tb != b or te >= e:
                continue
            if t in lost:
                lose(catalog, t, cur, now,
                      f"lost: its worker stopped heartbeating; block {b} taken over by {worker}")
                stats.lost += 1
            else:
                catalog.release(cur[2] or worker, [(t, tok)], now=now)
    # a task named by the record that left the block since (retried elsewhere, recalled) is
    # not taken back
    take = tasks if rec.tasks is None else _still_in(db, tasks, b)
    claimed = catalog.claim_with_tokens([(t, token_of(b, e, t), worker) for t in take], now=now)
    stats.claimed += claimed
    if claimed:
        db.execute("UPDATE fs_blocks SET closed=0 WHERE id=? AND closed=1", (b,))
    if e > 0:
        db.executemany(
            "INSERT OR IGNORE INTO fs_export(task, block) SELECT id, ? FROM tasks"
            " WHERE id=? AND token=?",
            [(b, t, token_of(b, e, t)) for t in tasks],
        )


def _still_in(db, tasks: list[int], block: int) -> list[int]:
    """The tasks of ``tasks`` that are in ``block`` or in no block (not moved elsewhere)."""
    out = []
    for chunk in chunks(tasks):
        where = dict(db.execute(
            f"SELECT task, block FROM fs_export WHERE task IN ({qs(len(chunk))})", chunk))
        out += [t for t in chunk if where.get(t, block) == block]
    return out


def _apply_ended(catalog: SQLiteStore, worker: str, recs: list[Ended], now: float,
                 stats: FoldStats) -> set[int]:
    db = catalog.db
    cur = _current(db, (r.task for r in recs))
    effective: list[Ended] = []
    send: list[Ended] = []
    seen: set[tuple[int, int]] = set()
    for r in recs:
        key = (r.task, r.token)
        if key in seen:
            continue  # the same lease reported twice: nothing more to record
        seen.add(key)
        c = cur.get(r.task)
        if c is not None and c[1] == r.token:
            if c[0] in states.ACTIVE:
                effective.append(r)
            elif c[0] == State.SUCCEEDED:
                continue  # a repeat of the end already committed: changes nothing
        send.append(r)  # effective ones commit; the others become stale attempts
    catalog.finish(
        worker,
        [Finished(r.task, r.token, r.outcome, r.started_at, r.ended_at, r.result, error=r.error,
                  exit_code=r.exit_code, note=r.note, output=r.output, attempt=r.attempt,
                  peak_memory=r.peak_memory)
         for r in send],
        now=now,
    )
    stats.ended += len(effective)
    stats.stale += len(send) - len(effective)
    files = [(r.task, r.token, r.result_file) for r in effective if r.result_file]
    if files:
        catalog.set_result_files(files)
    leave = [(r.task, split_token(r.token, r.task)[0]) for r in effective
             if r.outcome != int(Outcome.RELEASED)]
    if leave:
        db.executemany("DELETE FROM fs_export WHERE task=? AND block=?", leave)
    return {split_token(r.token, r.task)[0] for r in effective}


def _close_settled(layout: Layout, catalog: SQLiteStore, blocks: Iterable[int],
                   stats: FoldStats) -> None:
    """Blocks with no task left in them are closed; their latest epoch gets a done marker."""
    db = catalog.db
    for b in sorted(blocks):
        row = db.execute("SELECT epoch, closed FROM fs_blocks WHERE id=?", (b,)).fetchone()
        if row is None or row[1]:
            continue
        if db.execute("SELECT 1 FROM fs_export WHERE block=? LIMIT 1", (b,)).fetchone():
            continue
        db.execute("UPDATE fs_blocks SET closed=1 WHERE id=?", (b,))
        stats.closed += 1
        if row[0] >= 0:
            create_excl(f"{layout.claim(b, row[0])}.done")


def drop_terminal_exports(catalog: SQLiteStore) -> int:
    """Terminal tasks leave their blocks (after a cancel, or before a retry)."""
    return catalog.db.execute(
        "DELETE FROM fs_export WHERE task IN (SELECT e.task FROM fs_export e JOIN tasks t"
        f" ON t.id = e.task WHERE t.state IN {states.sql_list(states.TERMINAL)})"
    ).rowcount

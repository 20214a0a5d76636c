"""The catalog side of the shared-filesystem protocol: fold journals, export waves, fence blocks.

Only the process that holds the catalog (``RUN/catalog.db``) runs this module; workers never
open the catalog (see :mod:`.fsjournal` for the files and the worker side).

Catalog tables added here (``CREATE TABLE IF NOT EXISTS``; sqlite.py is not changed):

``fs_export(task, block)``
    the block a task is offered in, while it is there: inserted at export, kept while the task
    is claimed, running, lost and adopted, or released by a worker's drain (the next claimant of
    the block adopts it); deleted when an attempt ends in it (succeeded, failed, timed out: a
    retry is exported again in a later wave, after its backoff), when the block is fenced, or
    when the task is cancelled.
``fs_blocks(id, epoch, holder, n, cpus, gpus, written, closed, wave, created)``
    every block exported: its latest folded epoch and holder; ``closed`` once no task is left
    in it (then ``claims/<b>.<e>.done`` is created too) or once fenced.
``fs_cursors(journal, offset)``
    how far each journal has been folded: updated in the same transaction as the records it
    covers, so a fold is idempotent and a folder killed mid-way loses nothing.
``fs_specs(id)``
    specs written to ``fs/specs``.
``fs_children(id, parent, parent_epoch, cut)``
    child blocks made by workers' splits (see :mod:`.fsjournal`), once the catalog learns of
    them: from a worker's ``Claimed`` of the child, or from the cut slots a fence seals. The
    child's tasks then move from the parent's rows of ``fs_export`` to the child's, and leases
    held under the parent's token end (released: they never started there) when the child's
    claim is applied.

Folding (:func:`fold`) reads every journal from its cursor (a torn tail stops the read there;
its owner truncates it when it reopens), decodes the records and applies them in one
transaction, through the SQLite store's own methods (``finish``, ``release``) or SQL restricted
to the sources :mod:`pipefarm.states` allows:

1. :class:`~.fsjournal.Claimed` records of the pass first, in ``(block, epoch)`` order: the
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

Only one process folds at a time (:class:`FoldLock`: exclusive-create lock files
``fs/fold/<n>``, never deleted while current; a stale one is superseded by creating ``n+1``,
judged by its mtime against the folder's own freshly touched heartbeat, or at once when its
holder was a process on this host that no longer exists).

Exporting (:func:`export`) moves ready tasks that are in no block into new blocks, in claim
order (priority, cost, id), grouped by resource class, sized by :func:`plan_blocks` from the
task count, the workers and the tasks' ``cost`` (read as estimated seconds): about eight blocks
per worker, at least :data:`CHEAP_MIN_BLOCK` cheap tasks per block, down to one task per block
for long tasks or when there are few. The catalog
rows are committed first, then the spec and block files are written, then ``fs/wave``; blocks
whose files were never written (a crash in between) are written by the next export before
anything else. Dependent tasks become ready as the fold records their dependencies' success,
and go out in a later wave.

Fencing (:func:`reap_blocks`, :func:`recall_blocks`): the catalog holder takes a block back by
winning the exclusive create of its next epoch with a tombstone (``!fence ...``) plus a
``.done`` marker, then seals the cut slots of the earlier epochs (tasks already given to a
child block go to that child, which is fenced in turn when nobody holds it); the block's other
claimed and running tasks become released and ``lost`` attempts and leave the block. A race
with a worker taking the same epoch is decided by the create.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import msgspec

from .. import states
from ..states import Outcome, State
from ..task import Finished, Resources
from .fsjournal import (
    CHILD_BASE,
    MAX_EPOCH,
    BlockFile,
    Claimed,
    Cut,
    Layout,
    Liveness,
    Wave,
    create_excl,
    decode,
    is_child,
    mtime_ns,
    read_small,
    seal_cuts,
    split_token,
    stale,
    token_of,
    touch,
    write_atomic,
)
from .journal import Ended, Released, Started, _fsync_dir, read_journal
from .sqlite import SQLiteStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS fs_export(task INTEGER PRIMARY KEY, block INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS ix_fs_export_block ON fs_export(block);
CREATE TABLE IF NOT EXISTS fs_blocks(
  id INTEGER PRIMARY KEY, epoch INTEGER NOT NULL DEFAULT -1, holder TEXT,
  n INTEGER NOT NULL, cpus INTEGER NOT NULL DEFAULT 1, gpus INTEGER NOT NULL DEFAULT 0,
  written INTEGER NOT NULL DEFAULT 0, closed INTEGER NOT NULL DEFAULT 0, wave INTEGER,
  created REAL);
CREATE INDEX IF NOT EXISTS ix_fs_blocks_open ON fs_blocks(id) WHERE closed = 0;
CREATE TABLE IF NOT EXISTS fs_cursors(journal TEXT PRIMARY KEY, offset INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS fs_specs(id INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS fs_children(
  id INTEGER PRIMARY KEY, parent INTEGER NOT NULL, parent_epoch INTEGER NOT NULL,
  cut INTEGER NOT NULL);
"""

_CHUNK = 500
_ACTIVE = (int(State.CLAIMED), int(State.RUNNING))


def _chunks(seq: Sequence, n: int = _CHUNK) -> Iterable[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _qs(n: int) -> str:
    return ",".join("?" * n)


def ensure_schema(catalog: SQLiteStore) -> None:
    """Add the protocol's tables to a catalog (idempotent)."""
    if getattr(catalog, "_fs_schema", False):
        return
    with catalog.transaction():
        db = catalog.db
        for stmt in SCHEMA.split(";"):
            if stmt.strip():
                db.execute(stmt)
    catalog._fs_schema = True  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------ the lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FoldLock:
    """Who may fold: the holder of the highest ``fs/fold/<n>`` (content ``holder host pid``).

    Taken by creating ``n+1`` exclusively when ``n`` is released (``<n>.released``), held by a
    dead process on this host, or stale by :class:`~.fsjournal.Liveness` (its mtime stopped
    changing; compared with the taker's own freshly touched heartbeat file), which takes
    ``lease_s / 2`` or more of watching: pass ``wait`` to :meth:`acquire`. The holder touches its file at least every
    ``lease_s / 4`` while it folds (:meth:`refresh`) and checks that no ``n+1`` appeared when
    it may have lapsed.
    """

    def __init__(self, layout: Layout, holder: str, lease_s: float) -> None:
        self.layout = layout
        self.dir = layout.foldlock
        self.holder = holder
        self.lease_s = lease_s
        self.n: int | None = None
        self._touched = float("-inf")
        self._verified = float("-inf")
        self._live = Liveness(lease_s)

    @property
    def held(self) -> bool:
        return self.n is not None

    def _path(self, n: int) -> str:
        return f"{self.dir}/{n}"

    def _scan(self) -> tuple[int, bool]:
        top, released = 0, set()
        for name in os.listdir(self.dir):
            parts = name.split(".")
            try:
                n = int(parts[0])
            except ValueError:
                continue
            if len(parts) == 1:
                top = max(top, n)
            elif parts[1:] == ["released"]:
                released.add(n)
        return top, top in released

    def _stale(self, n: int, content: str) -> bool:
        parts = content.split()
        if len(parts) >= 3 and parts[1] == socket.gethostname():
            with contextlib.suppress(ValueError):
                if not _pid_alive(int(parts[2])):
                    return True
        def ref() -> int:
            hb = self.layout.hb_of(self.holder)
            touch(hb)
            return mtime_ns(hb) or time.time_ns()

        return self._live.dead(self._path(n), mtime_ns(self._path(n)), ref)

    def _try(self) -> bool:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        top, released = self._scan()
        if top and not released:
            data = read_small(self._path(top)) or b""
            content = data.decode(errors="replace").strip()
            if content.split()[:1] == [self.holder]:
                self.n = top
                self._touched = self._verified = time.monotonic()
                return True
            if not self._stale(top, content):
                return False
        me = f"{self.holder} {socket.gethostname()} {os.getpid()}\n".encode()
        if not create_excl(self._path(top + 1), me):
            return False
        self.n = top + 1
        self._touched = self._verified = time.monotonic()
        for name in os.listdir(self.dir):  # tidy: keep the last two
            with contextlib.suppress(ValueError, OSError):
                if int(name.split(".")[0]) < self.n - 1:
                    os.unlink(f"{self.dir}/{name}")
        return True

    def acquire(self, wait: float = 0.0) -> bool:
        """Take the lock, waiting up to ``wait`` seconds; whether it is held."""
        if self.n is not None:
            return True
        deadline = time.monotonic() + wait
        delay = 0.02
        while True:
            if self._try():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(0.5, delay * 1.5)

    def refresh(self) -> bool:
        """Keep the lock alive; False (and not held any more) when someone took it over."""
        if self.n is None:
            return False
        mono = time.monotonic()
        lapsed = mono - self._touched >= self.lease_s / 2
        if mono - self._touched >= self.lease_s / 4:
            try:
                os.utime(self._path(self.n), None)
            except FileNotFoundError:
                self.n = None
                return False
            self._touched = mono
        if lapsed or mono - self._verified >= self.lease_s / 2:
            if os.path.exists(self._path(self.n + 1)):
                self.n = None
                return False
            self._verified = mono
        return True

    def release(self) -> None:
        if self.n is not None:
            create_excl(self._path(self.n) + ".released")
            self.n = None


# ------------------------------------------------------------------------------------- folding
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
        from .fsjournal import new_worker_id

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
            touched.update(_ancestors(db, b))
    # a start whose end is in the same pass needs no write: the end moves the task from
    # claimed straight to its outcome (and carries the start time)
    ends = {(rec.task, rec.token) for _, rec in batch if isinstance(rec, Ended)}
    started = [(rec.t, rec.task, rec.token) for _, rec in batch
               if isinstance(rec, Started) and (rec.task, rec.token) not in ends]
    stats.started += sum(isinstance(rec, Started) for _, rec in batch) - len(started)
    if started:
        stats.started += db.executemany(
            f"UPDATE tasks SET state={int(State.RUNNING)}, started_at=?"
            f" WHERE id=? AND token=? AND state IN {states.sql_in(State.RUNNING)}",
            started,
        ).rowcount
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
    for chunk in _chunks(sorted(set(ids))):
        for r in db.execute(
            f"SELECT id, state, token, worker, started_at FROM tasks WHERE id IN ({_qs(len(chunk))})",
            chunk,
        ):
            out[r[0]] = r[1:]
    return out


def _lose(catalog: SQLiteStore, task: int, row: tuple, now: float, why: str) -> None:
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
        _lose(catalog, task, row, now, why)


def _ancestors(db, block: int) -> set[int]:
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
    for chunk in _chunks(tasks):
        db.execute(
            f"UPDATE fs_export SET block=? WHERE block=? AND task IN ({_qs(len(chunk))})",
            [block, bf.parent, *chunk],
        )
    if stats is not None:
        stats.splits += 1
    return True


def _register_cuts(layout: Layout, catalog: SQLiteStore, cuts: list[Cut], now: float
                   ) -> list[int]:
    """Register the children of agreed cuts (from :func:`~.fsjournal.seal_cuts`)."""
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
    ancestors = _ancestors(db, b)
    if e > 0 or ancestors:
        lost = set(rec.lost)
        for t, cur in _current(db, set(tasks) | lost).items():
            state, tok = cur[0], cur[1]
            if state not in _ACTIVE or tok is None:
                continue
            tb, te = split_token(tok, t)
            if tb in ancestors:  # claimed in the block it was split from, never started there
                _end_held(catalog, t, cur, worker, now,
                          f"lost: running in block {tb} when it was split off to block {b}")
                continue
            if tb != b or te >= e:
                continue
            if t in lost:
                _lose(catalog, t, cur, now,
                      f"lost: its worker stopped heartbeating; block {b} taken over by {worker}")
                stats.lost += 1
            else:
                catalog.release(cur[2] or worker, [(t, tok)], now=now)
    head = (f"UPDATE tasks SET state={int(State.CLAIMED)}, token=?, worker=?, claimed_at=?,"
            f" attempt=attempt+1, ready_at=NULL WHERE id=? AND state IN {states.sql_in(State.CLAIMED)}")
    if rec.tasks is None:  # the block's own tasks, read from fs_export above
        cur = db.executemany(head, [(token_of(b, e, t), worker, now, t) for t in tasks])
    else:  # a task that left the block (retried elsewhere, recalled) is not taken back
        cur = db.executemany(
            head + " AND coalesce((SELECT block FROM fs_export WHERE task=tasks.id), ?)=?",
            [(token_of(b, e, t), worker, now, t, b, b) for t in tasks],
        )
    stats.claimed += cur.rowcount
    if cur.rowcount:
        db.execute("UPDATE fs_blocks SET closed=0 WHERE id=? AND closed=1", (b,))
    if e > 0:
        db.executemany(
            "INSERT OR IGNORE INTO fs_export(task, block) SELECT id, ? FROM tasks"
            " WHERE id=? AND token=?",
            [(b, t, token_of(b, e, t)) for t in tasks],
        )


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
            if c[0] in _ACTIVE:
                effective.append(r)
            elif c[0] == State.SUCCEEDED:
                continue  # a repeat of the end already committed: changes nothing
        send.append(r)  # effective ones commit; the others become stale attempts
    catalog.finish(
        worker,
        [Finished(r.task, r.token, r.outcome, r.started_at, r.ended_at, r.result, error=r.error,
                  exit_code=r.exit_code, note=r.note, output=r.output, attempt=r.attempt)
         for r in send],
        now=now,
    )
    stats.ended += len(effective)
    stats.stale += len(send) - len(effective)
    files = [(r.result_file, r.task, r.token) for r in effective if r.result_file]
    if files:
        db.executemany(
            f"UPDATE tasks SET result_file=? WHERE id=? AND token=? AND state={int(State.SUCCEEDED)}",
            files,
        )
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


# ------------------------------------------------------------------------------------- export
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
    for chunk in _chunks(list(ids)):
        for r in db.execute(
            "SELECT t.id, t.spec, t.args, t.attempt, t.lost, s.cpus, s.gpus FROM tasks t"
            f" JOIN specs s ON s.id = t.spec WHERE t.id IN ({_qs(len(chunk))})",
            chunk,
        ):
            rows[r[0]] = r
    return [rows[t] for t in ids if t in rows]


def _new_blocks(layout: Layout, catalog: SQLiteStore, groups: list[list[tuple]], now: float,
                wave: int | None) -> list[tuple[int, BlockFile]]:
    """Insert catalog rows for blocks of ``groups`` (rows of :func:`_block_rows`)."""
    db = catalog.db
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
        "INSERT INTO fs_export(task, block) VALUES (?, ?)",
        [(e[0], b) for b, bf in out for e in bf.entries],
    )
    return out


def _write_block(layout: Layout, bf: BlockFile, fsync: bool = True) -> None:
    write_atomic(layout.block(bf.block), msgspec.msgpack.encode(bf), fsync=fsync)


def export_block(layout: Layout, catalog: SQLiteStore, ids: Sequence[int], now: float) -> int:
    """One block of exactly ``ids`` (in that order), written at once; its id. Call inside a
    catalog transaction (the store's ``claim``)."""
    rows = _block_rows(catalog.db, ids)
    _write_specs(layout, catalog, {r[1] for r in rows})
    ((b, bf),) = _new_blocks(layout, catalog, [rows], now, None)
    _write_block(layout, bf, fsync=False)
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
    each other's blocks as they run (see :mod:`.fsjournal`).
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
            by_class: dict[tuple[int, int], list[tuple]] = {}
            for r in rows:
                by_class.setdefault((r[5], r[6]), []).append(r)
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
        db.execute("INSERT OR REPLACE INTO meta VALUES('fs_wave', ?)", (seq,))
    for _, bf in made:
        _write_block(layout, bf)
    if made:
        _fsync_dir(layout.blocks)
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
    for chunk in _chunks(list(ids)):
        out += db.execute(f"SELECT id, cost FROM tasks WHERE id IN ({_qs(len(chunk))})",
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
    final = pending is None
    write_atomic(layout.wave, msgspec.msgpack.encode(Wave(top, final, seq, classes)))
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
            _write_block(layout, BlockFile(b, cpus, gpus,
                                           [(r[0], r[1], r[2], r[3], r[4]) for r in rows]))
            n += 1
        with catalog.transaction():
            db.execute("UPDATE fs_blocks SET written=1 WHERE id=?", (b,))
    return n


# ------------------------------------------------------------------------------------ fencing
def _fence_effects(layout: Layout, catalog: SQLiteStore, b: int, epoch: int, now: float) -> int:
    """The catalog side of a fence: leases in block ``b`` end, its tasks leave it."""
    db = catalog.db
    rows = db.execute(
        "SELECT t.id, t.state, t.token, t.worker, t.started_at, t.lost, s.max_lost FROM tasks t"
        " JOIN fs_export e ON e.task = t.id JOIN specs s ON s.id = t.spec"
        f" WHERE e.block=? AND t.state IN {_ACTIVE}",
        (b,),
    ).fetchall()
    n = 0
    mine = _ancestors(db, b) | {b}
    for tid, state, tok, worker, started_at, lost, max_lost in rows:
        if tok is None or split_token(tok, tid)[0] not in mine:
            continue
        n += 1
        if state == State.CLAIMED:
            catalog.release(worker or "?", [(tid, tok)], now=now)
        else:
            why = ("lost: its worker stopped heartbeating (killed, or its host lost)"
                   if lost + 1 < max_lost else f"lost {lost + 1} times: its worker died each time")
            _lose(catalog, tid, (state, tok, worker, started_at), now, why)
    db.execute("DELETE FROM fs_export WHERE block=?", (b,))
    db.execute("UPDATE fs_blocks SET closed=1, epoch=max(epoch, ?), holder='!fence' WHERE id=?",
               (epoch, b))
    create_excl(f"{layout.claim(b, epoch)}.done")
    return n


def _fenced(layout: Layout, catalog: SQLiteStore, b: int, k: int, now: float, me: str) -> int:
    """Block ``b`` is ours at epoch ``k`` (a tombstone): seal the cut slots of the epochs
    before it, hand the tasks they gave away to their child blocks, then end the rest."""
    if k > 0:
        _register_cuts(layout, catalog, seal_cuts(layout, b, k - 1, me), now)
    return _fence_effects(layout, catalog, b, k, now)


def _fence(layout: Layout, catalog: SQLiteStore, b: int, epoch: int, *, dead, now: float,
           me: str) -> int | None:
    """Take block ``b`` back, starting at ``epoch`` (its latest known epoch + 1). ``dead(h)``
    says whether holder ``h`` has expired. Returns the leases ended, or None when a live
    worker holds a newer epoch."""
    k = epoch
    while k <= MAX_EPOCH:
        if create_excl(layout.claim(b, k), f"!fence {me}".encode()):
            return _fenced(layout, catalog, b, k, now, me)
        data = read_small(layout.claim(b, k), 4096)
        holder = (data or b"").decode(errors="replace").strip()
        if holder.startswith("!"):
            return _fenced(layout, catalog, b, k, now, me)  # an earlier fence, half done
        if holder:
            if not dead(holder):
                return None
        elif data is None or not dead(None, layout.claim(b, k)):
            return None
        k += 1
    return None


def _expiry(layout: Layout, ref_ns: int, lease_s: float, forced: set[str],
            liveness: Liveness | None):
    """``dead(holder)`` (or ``dead(None, claim_path)`` for a claim file with no holder yet):
    by ``liveness`` when given (real clocks), else by comparing with ``ref_ns`` alone (a
    simulated clock: heartbeats were stamped with it)."""
    cache: dict[str, bool] = {}

    def judge(key: str, mtime: int | None) -> bool:
        if liveness is None:
            return stale(mtime, ref_ns, lease_s)
        return liveness.dead(key, mtime, ref_ns)

    def dead(holder: str | None, claim_path: str | None = None) -> bool:
        if holder is None:
            return judge(claim_path, mtime_ns(claim_path)) if claim_path else True
        if holder in forced:
            return True
        if holder not in cache:
            cache[holder] = judge(holder, mtime_ns(layout.hb_of(holder)))
        return cache[holder]

    return dead


def reap_blocks(
    layout: Layout,
    catalog: SQLiteStore,
    *,
    lease_s: float,
    ref_ns: int,
    now: float | None = None,
    workers: Iterable[str] | None = None,
    me: str = "catalog",
    liveness: Liveness | None = None,
) -> int:
    """Fence every open block whose holder expired or is in ``workers`` and that still has
    leases; return the number of leases ended (lost or released). Expiry: by ``liveness``
    (keep one across calls: it watches mtimes change), or, without it, a heartbeat mtime more
    than ``lease_s`` before ``ref_ns`` (simulated clocks). Call inside a catalog transaction,
    after a fold."""
    now = time.time() if now is None else now
    dead = _expiry(layout, ref_ns, lease_s, set(workers or ()), liveness)
    db = catalog.db
    n = 0
    for b, e, holder in db.execute(
        "SELECT id, epoch, holder FROM fs_blocks WHERE closed=0 AND epoch >= 0"
    ).fetchall():
        if not dead(holder):
            continue
        if not db.execute(
            "SELECT 1 FROM fs_export e JOIN tasks t ON t.id = e.task WHERE e.block=?"
            f" AND t.state IN {_ACTIVE} LIMIT 1",
            (b,),
        ).fetchone():
            continue
        got = _fence(layout, catalog, b, e + 1, dead=dead, now=now, me=me)
        n += got or 0
    return n


def recall_blocks(
    layout: Layout,
    catalog: SQLiteStore,
    *,
    lease_s: float,
    ref_ns: int,
    now: float | None = None,
    me: str = "catalog",
    liveness: Liveness | None = None,
) -> int:
    """Fence every open block that no live worker holds (never claimed, released, expired):
    its tasks return to the catalog. Returns the number of tasks taken back."""
    now = time.time() if now is None else now
    dead = _expiry(layout, ref_ns, lease_s, set(), liveness)
    db = catalog.db
    n = 0
    done: set[int] = set()
    while True:  # a fence can register child blocks (split off before it): those too
        todo = [(b, e) for b, e in db.execute("SELECT id, epoch FROM fs_blocks WHERE closed=0")
                if b not in done]
        if not todo:
            return n
        done.update(b for b, _ in todo)
        n += _recall_pass(layout, catalog, todo, dead, now, me)


def _recall_pass(layout: Layout, catalog: SQLiteStore, todo: list[tuple[int, int]], dead,
                 now: float, me: str) -> int:
    db = catalog.db
    n = 0
    for b, e in todo:
        k = e
        while os.path.exists(layout.claim(b, k + 1)):
            k += 1
        if k >= 0 and not os.path.exists(f"{layout.claim(b, k)}.released"):
            holder = (read_small(layout.claim(b, k), 4096) or b"").decode().strip()
            if holder.startswith("!"):
                _fenced(layout, catalog, b, k, now, me)
                continue
            if holder and not dead(holder):
                continue
            if not holder and not dead(None, layout.claim(b, k)):
                continue
        left = _exported(db, b) + _in_children(db, b)
        if _fence(layout, catalog, b, k + 1, dead=dead, now=now, me=me) is not None:
            n += left - _in_children(db, b)  # split off meanwhile: its child's to take back
    return n


def _exported(db, b: int) -> int:
    return db.execute("SELECT count(*) FROM fs_export WHERE block=?", (b,)).fetchone()[0]


def _in_children(db, b: int) -> int:
    return db.execute("SELECT count(*) FROM fs_export e JOIN fs_children c ON c.id = e.block"
                      " WHERE c.parent=?", (b,)).fetchone()[0]

"""Fencing: the catalog holder takes blocks back from workers that died or left.

Fencing (:func:`reap_blocks`, :func:`recall_blocks`): the catalog holder takes a block back by
winning the exclusive create of its next epoch with a tombstone (``!fence ...``) plus a
``.done`` marker, then seals the cut slots of the earlier epochs (tasks already given to a
child block go to that child, which is fenced in turn when nobody holds it); the block's other
claimed and running tasks become released and ``lost`` attempts and leave the block. A race
with a worker taking the same epoch is decided by the create.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from ...states import State
from ..sqlite import SQLiteStore
from .claims import seal_cuts
from .folding import ancestors, lose, register_cuts
from .layout import Layout
from .primitives import MAX_EPOCH, Liveness, create_excl, mtime_ns, read_small, split_token, stale
from .tables import ACTIVE_SQL


def _fence_effects(layout: Layout, catalog: SQLiteStore, b: int, epoch: int, now: float) -> int:
    """The catalog side of a fence: leases in block ``b`` end, its tasks leave it."""
    db = catalog.db
    rows = db.execute(
        "SELECT t.id, t.state, t.token, t.worker, t.started_at, t.lost, s.max_lost FROM tasks t"
        " JOIN fs_export e ON e.task = t.id JOIN specs s ON s.id = t.spec"
        f" WHERE e.block=? AND t.state IN {ACTIVE_SQL}",
        (b,),
    ).fetchall()
    n = 0
    mine = ancestors(db, b) | {b}
    for tid, state, tok, worker, started_at, lost, max_lost in rows:
        if tok is None or split_token(tok, tid)[0] not in mine:
            continue
        n += 1
        if state == State.CLAIMED:
            catalog.release(worker or "?", [(tid, tok)], now=now)
        else:
            why = ("lost: its worker stopped heartbeating (killed, or its host lost)"
                   if lost + 1 < max_lost else f"lost {lost + 1} times: its worker died each time")
            lose(catalog, tid, (state, tok, worker, started_at), now, why)
    db.execute("DELETE FROM fs_export WHERE block=?", (b,))
    db.execute("UPDATE fs_blocks SET closed=1, epoch=max(epoch, ?), holder='!fence' WHERE id=?",
               (epoch, b))
    create_excl(f"{layout.claim(b, epoch)}.done")
    return n


def _fenced(layout: Layout, catalog: SQLiteStore, b: int, k: int, now: float, me: str) -> int:
    """Block ``b`` is ours at epoch ``k`` (a tombstone): seal the cut slots of the epochs
    before it, hand the tasks they gave away to their child blocks, then end the rest."""
    if k > 0:
        register_cuts(layout, catalog, seal_cuts(layout, b, k - 1, me), now)
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
            f" AND t.state IN {ACTIVE_SQL} LIMIT 1",
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


"""The SQLite store: ``RUN/catalog.db`` in WAL mode, one writer process per run.

The task row holds the task's *current* (or last) attempt; attempts that a task leaves behind
(failed and retried, lost, released mid-run, stale results of superseded leases) are archived
in ``attempts``. A task that succeeds on its first try therefore costs one row insert and three
updates, with no per-attempt insert on the hot path.

Every write method is one transaction; callers batch (claim many, finish many), so the engine
spends microseconds per task. Transitions are restricted in SQL to the source states that
:mod:`pipefarm.states` allows.

Still one piece past 1,000 lines because every method here is one write transaction of one
state machine over one connection (the lease protocol, its coordinator variant, the user
actions and the fold's writes share ``_tx`` and the compare-and-set helpers); the schema and
the read side live in :mod:`.schema` and :mod:`.query`.
"""

from __future__ import annotations

import errno
import itertools
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ... import states
from ...errors import CatalogDamaged
from ...states import Outcome, State
from ...task import INLINE_RESULT_MAX, Finished, Lease, Resources, Spec, spec_options_blob
from ..base import DEFAULT_LEASE_S, Store, TaskIds
from . import schema
from .query import BACKENDS_KEY, CatalogQuery, select_spec
from .schema import (
    _ACTIVE,
    _READY,
    _S,
    _TERMINAL,
    _UNSUCCESSFUL,
    _UNSUCCESSFUL_STATES,
    _chunks,
    _qs,
)


class StoreError(RuntimeError):
    """A store operation failed for a reason the user can act on."""


class DiskFull(StoreError):
    """The disk holding the run is full; nothing of the failed write was committed."""


def _key_text(key: Any) -> Any:
    """A key as the catalog stores it (the column is TEXT: a number is kept as its text)."""
    return key if key is None or type(key) is str else str(key)


def _repeated(key: str) -> str:
    return f"key {key!r} appears more than once in this submission; keys name one task each"



#: How long an empty ``catalog.db`` may stay empty before it counts as damaged: another
#: process creating the run has the file at zero bytes for a moment (until its first write).
_EMPTY_CATALOG_GRACE_S = 1.0

#: SQLite's primary result codes for a file that is not (or no longer) a database
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


def is_damage(exc: sqlite3.DatabaseError) -> bool:
    """Whether SQLite's error says the file itself is damaged (not locked, not a full disk)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    msg = str(exc)
    return "malformed" in msg or "not a database" in msg


def _refuse_empty(db: Path) -> None:
    """An existing zero-length catalog would silently open as a new, empty run: refuse it
    (after a moment's grace for a run another process is creating right now)."""
    deadline = time.monotonic() + _EMPTY_CATALOG_GRACE_S
    while True:
        try:
            if db.stat().st_size > 0:
                return
        except FileNotFoundError:
            return  # a new run: SQLite creates it
        wal = db.with_name(db.name + "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            return  # written, not yet checkpointed: SQLite reads it from the WAL
        if time.monotonic() > deadline:
            raise CatalogDamaged(str(db), "the file is empty")
        time.sleep(0.05)


class SQLiteStore(CatalogQuery, Store):
    """Durable task state in one SQLite file (see the module docstring); its query side is
    :class:`~.query.CatalogQuery`'s, on the writer's own connection."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        lease_s: float = DEFAULT_LEASE_S,
        *,
        synchronous: str = "FULL",
        readonly: bool = False,
    ) -> None:
        self.lease_s = lease_s
        self._depth = 0
        self._tx_files: list[Path] = []  # result files written in the open transaction
        if str(path) == ":memory:":
            self.run_dir: Path | None = None
            db = ":memory:"
        else:
            self.run_dir = Path(path)
            db = str(self.run_dir / "catalog.db")
            _refuse_empty(Path(db))
            if readonly:
                db = f"file:{db}?mode=ro"
        try:
            self._connect(db, synchronous, readonly)
        except sqlite3.DatabaseError as exc:
            if not is_damage(exc):
                raise
            if hasattr(self, "db"):
                self.close()
            raise CatalogDamaged(str(self.run_dir / "catalog.db") if self.run_dir else db,
                                 str(exc)) from None

    def _connect(self, db: str, synchronous: str, readonly: bool) -> None:
        """Open the catalog, create what is missing and read what every open needs."""
        self.db = sqlite3.connect(
            db, isolation_level=None, check_same_thread=False, uri=readonly, timeout=30.0
        )
        self.db.execute("PRAGMA busy_timeout=30000")
        if not readonly:
            schema.set_write_pragmas(self.db, synchronous)
            with self._tx() as db:
                schema.create(db)
        self._has_deps = bool(
            self.db.execute("SELECT 1 FROM deps LIMIT 1").fetchone()
        )
        self._keys_unique = schema.ensure_key_index(
            self.db, self._tx, not readonly, self.run_dir)
        self._specs: dict[int, Spec] = {}

    # --- plumbing --------------------------------------------------------------------------------
    def drop_views_index(self) -> None:
        if self.db.execute("SELECT 1 FROM sqlite_master WHERE type='index' AND name=?",
                           (schema.VIEWS_INDEX,)).fetchone():
            with self._tx() as db:
                db.execute(f"DROP INDEX IF EXISTS {schema.VIEWS_INDEX}")

    @contextmanager
    def transaction(self):
        """Group several write methods into one transaction (all or nothing)."""
        with self._tx():
            yield self

    @contextmanager
    def _tx(self):
        """One write transaction; a full disk becomes :class:`DiskFull`, all rolled back.

        Nested use joins the outer transaction.
        """
        if self._depth:
            self._depth += 1
            try:
                yield self.db
            finally:
                self._depth -= 1
            return
        self._depth = 1
        committed = False
        try:
            yield from self._outer_tx()
            committed = True
        finally:
            self._depth = 0
            if not committed:  # result files written for a transaction that did not commit
                for p in self._tx_files:
                    p.unlink(missing_ok=True)
            self._tx_files.clear()

    def _outer_tx(self):
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise self._translate(exc) from exc
        try:
            yield self.db
        except BaseException as exc:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if isinstance(exc, sqlite3.OperationalError):
                raise self._translate(exc) from exc
            raise
        try:
            self.db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise self._translate(exc) from exc

    def _translate(self, exc: sqlite3.OperationalError) -> Exception:
        msg = str(exc)
        if "full" in msg or "No space" in msg:
            where = self.run_dir or "memory"
            return DiskFull(
                f"the disk holding {where} is full: nothing of this write was saved; "
                "free some space and run again to resume"
            )
        return exc

    @staticmethod
    def _now(now: float | None) -> float:
        return time.time() if now is None else now

    def close(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:
            pass

    def set_meta(self, key: str, value: Any) -> None:
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES(?, ?)", (key, value))

    def note_backend(self, name: str) -> None:
        """Add ``name`` to the backends this run has executed on (:meth:`backends_used`)."""
        used = self.backends_used()
        if name not in used:
            self.set_meta(BACKENDS_KEY, ",".join([*used, name]))

    # --- submission ------------------------------------------------------------------------------
    def add_spec(self, spec: Spec) -> int:
        with self._tx():
            cur = self.db.execute(
                "INSERT INTO specs(kind, payload, max_attempts, timeout, backoff, max_lost, cpus,"
                " gpus, memory, tags, name, options) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    spec.kind, spec.payload, spec.max_attempts, spec.timeout, spec.backoff,
                    spec.max_lost, spec.resources.cpus, spec.resources.gpus,
                    spec.resources.memory, ",".join(spec.tags), spec.name,
                    spec_options_blob(spec),
                ),
            )
            sid = int(cur.lastrowid)
        self._specs[sid] = spec
        return sid

    def spec(self, spec_id: int) -> Spec:
        spec = self._specs.get(spec_id)
        if spec is None:
            spec = select_spec(self.db, spec_id)
            if spec is None:
                raise KeyError(f"no spec {spec_id}")
            self._specs[spec_id] = spec
        return spec

    def add_tasks(
        self,
        spec_id: int,
        args: Iterable[bytes | None],
        *,
        keys: Iterable[str | None] | None = None,
        priority: int = 0,
        cost: float = 0.0,
        after: Sequence[int] = (),
        cache_keys: Sequence[bytes] | None = None,
        cache_hits: Sequence[tuple[bool, bytes | None]] | None = None,
        served_by: str = "",
    ) -> Sequence[int]:
        """Add one task per ``args`` blob of spec ``spec_id``; their ids.

        ``cache_keys``: each task's result cache key. ``cache_hits``: what the cache holds
        for each key, ``(hit, pickled result)``: a hit with a small result is written ended
        at once, as one attempt with outcome ``cached`` by worker ``served_by``, when the
        tasks wait for nothing (no user keys, no pending dependency); the others are left
        ready, for the lookup where they would run.
        """
        after = sorted({int(a) for a in after})
        cost = float(cost or 0.0)
        with self._tx() as db:
            first = (db.execute("SELECT max(id) FROM tasks").fetchone()[0] or 0) + 1
            state, ndeps = int(_S.READY), 0
            if after:
                found = {}
                for chunk in _chunks(after):
                    found.update(
                        db.execute(
                            f"SELECT id, state FROM tasks WHERE id IN ({_qs(len(chunk))})", chunk
                        ).fetchall()
                    )
                missing = [a for a in after if a not in found]
                if missing:
                    raise ValueError(f"unknown task id(s) in after=: {missing[:10]}")
                if any(s in _UNSUCCESSFUL_STATES for s in found.values()):
                    state = int(_S.SKIPPED)
                else:
                    ndeps = sum(1 for s in found.values() if s != _S.SUCCEEDED)
                    if ndeps:
                        state = int(_S.BLOCKED)
            # rows are built by zip in C (no Python frame per task); per-call constants go into
            # the statement itself
            consts = f"{int(spec_id)}, {int(state)}, {int(priority)}, {float(cost)!r}, {int(ndeps)}"
            ended = f"{int(spec_id)}, {int(_S.SUCCEEDED)}, {int(priority)}, {float(cost)!r}, 0"
            ids: Sequence[int]
            if keys is None and cache_keys is not None:  # the result cache's key, one per task
                rows: Iterable[tuple] = zip(args, cache_keys, itertools.count(first), strict=False)
                if cache_hits is not None and state == _S.READY:
                    rows = self._insert_cache_hits(db, rows, cache_hits, served_by, ended)
                db.executemany(
                    "INSERT INTO tasks(args, cache_key, id, spec, state, priority, cost, ndeps)"
                    f" VALUES (?, ?, ?, {consts})",
                    rows,
                )
                last = (db.execute("SELECT max(id) FROM tasks").fetchone()[0] or 0) + 1
                ids = added = range(first, last)
            elif keys is None:
                db.executemany(
                    "INSERT INTO tasks(args, id, spec, state, priority, cost, ndeps)"
                    f" VALUES (?, ?, {consts})",
                    zip(args, itertools.count(first)),
                )
                last = (db.execute("SELECT max(id) FROM tasks").fetchone()[0] or 0) + 1
                ids = added = range(first, last)
            else:
                ids = self._add_keyed(db, args, keys, first, consts)
                added = getattr(ids, "added", ids)
                if cache_keys is not None:
                    db.executemany("UPDATE tasks SET cache_key=? WHERE id=?",
                                   zip(cache_keys, ids, strict=True))
            if after and len(added):
                db.executemany(
                    "INSERT INTO deps(dep, task) VALUES (?, ?)",
                    ((d, t) for t in added for d in after),
                )
                db.executemany(
                    "UPDATE tasks SET children = children + ? WHERE id = ?",
                    ((len(added), d) for d in after),
                )
                self._has_deps = True
        return ids

    def _insert_cache_hits(
        self, db: sqlite3.Connection, rows: Iterable[tuple], hits: Sequence[tuple[bool, Any]],
        served_by: str, ended: str,
    ) -> list[tuple]:
        """Insert the tasks of ``rows`` whose small result the cache holds as ended (their
        attempt ``cached``); the rows of the others, to insert ready. One INSERT per task
        instead of an INSERT and an UPDATE: a fully cached rerun costs what its submission
        costs. ``ended``: the statement's constants (spec, state, priority, cost, ndeps)."""
        now, base = time.time(), secrets.randbits(61)  # tokens base + id: unique, no overflow
        rows = list(rows)
        small = [hit and (res is None or len(res) <= INLINE_RESULT_MAX) for hit, res in hits]
        served = [(*row, res) for row, (_, res), ok in zip(rows, hits, small, strict=True) if ok]
        if not served:
            return rows
        who = served_by.replace("'", "''")
        db.executemany(
            "INSERT INTO tasks(args, cache_key, id, result, token, started_at, ended_at,"
            " spec, state, priority, cost, ndeps, attempt, outcome, worker)"
            f" VALUES (?1, ?2, ?3, ?4, ?3 + {base}, {now!r}, {now!r}, {ended}, 1,"
            f" {int(Outcome.CACHED)}, '{who}')",
            served,
        )
        return [row for row, ok in zip(rows, small, strict=True) if not ok]

    def _add_keyed(
        self, db: sqlite3.Connection, args: Iterable[bytes | None],
        keys: Iterable[str | None], first: int, consts: str,
    ) -> Sequence[int]:
        """Insert keyed tasks; a key already in the run gives back its task's id instead.

        Fast path: one batched insert, the unique index on key doing the checking. At the first
        key it refuses (the rows before it stay inserted), the rest goes in chunks that look
        their keys up first, so a driver script run again costs lookups, not failed inserts.
        """
        sql = ("INSERT INTO tasks(args, key, id, spec, state, priority, cost, ndeps)"
               f" VALUES (?, ?, ?, {consts})")
        pairs: Iterator[tuple[bytes | None, str | None]] = zip(args, keys, strict=True)
        last: list[str | None] = [None]  # the key of the row executemany took last
        if not isinstance(keys, (list, tuple)):
            # a streamed source: remember each key as it passes instead of holding them all
            # (one generator step per row, ~5% of the insert; a list would cost memory per task)
            pairs = _remembering(pairs, last)
        nxt = first
        reused: set[str] = set()  # keys given back as existing tasks: a repeat is refused
        if self._keys_unique:
            try:
                # (args, key) + (id,) concatenated in C: no Python frame per task
                db.executemany(sql, map(tuple.__add__, pairs, zip(itertools.count(first))))
                last = (db.execute("SELECT max(id) FROM tasks").fetchone()[0] or 0) + 1
                return range(first, last)
            except sqlite3.IntegrityError as exc:
                if "tasks.key" not in str(exc):
                    raise
            # executemany stops at the refused row: it is the one after the last inserted
            nxt = (db.execute("SELECT max(id) FROM tasks").fetchone()[0] or 0) + 1
            ids: list[int] = list(range(first, nxt))
            refused = _key_text(keys[nxt - first] if isinstance(keys, (list, tuple)) else last[0])
            ids.append(self._existing_key(db, refused, first))
            reused.add(refused)
        else:  # an older catalog whose keys are not unique: look every key up
            ids = []
        while True:
            chunk = [(a, _key_text(k)) for a, k in itertools.islice(pairs, 8192)]
            if not chunk:
                break
            found = self._existing_keys(db, [k for _, k in chunk if k is not None], first)
            rows = []
            for a, k in chunk:
                tid = found.get(k) if k is not None else None
                if tid is None:
                    tid = nxt
                    nxt += 1
                    rows.append((a, k, tid))
                elif tid >= first or k in reused:
                    raise ValueError(_repeated(k))
                else:
                    reused.add(k)  # type: ignore[arg-type]
                ids.append(tid)
            db.executemany(sql, rows)
        out = TaskIds(ids)
        out.added = range(first, nxt)
        return out

    def _existing_keys(self, db: sqlite3.Connection, keys: Sequence[str],
                       first: int) -> dict[str, int]:
        """``{key: id}`` of the tasks that hold these keys (the oldest, where an old catalog
        has several); a key repeated within ``keys`` is refused."""
        found: dict[str, int] = {}
        if len(set(keys)) != len(keys):
            seen: set[str] = set()
            for k in keys:
                if k in seen:
                    raise ValueError(_repeated(k))
                seen.add(k)
        for chunk in _chunks(keys):
            for k, tid in db.execute(
                f"SELECT key, min(id) FROM tasks WHERE key IN ({_qs(len(chunk))}) GROUP BY key",
                chunk,
            ):
                found[k] = tid
        return found

    def _existing_key(self, db: sqlite3.Connection, key: str, first: int) -> int:
        """The id of the task that already holds ``key`` (the insert of it was refused)."""
        row = db.execute("SELECT min(id) FROM tasks WHERE key=?", (key,)).fetchone()
        if row is None or row[0] is None or row[0] >= first:
            raise ValueError(_repeated(key))
        return int(row[0])

    # --- the lease protocol ----------------------------------------------------------------------
    def register_worker(self, worker: str, host: str, pid: int, now: float | None = None) -> None:
        now = self._now(now)
        with self._tx():
            self.db.execute(
                "INSERT INTO workers(id, host, pid, started_at, heartbeat) VALUES (?,?,?,?,?)"
                " ON CONFLICT(id) DO UPDATE SET heartbeat=excluded.heartbeat, gone=0",
                (worker, host, pid, now, now),
            )

    def claim(
        self, worker: str, n: int, resources: Resources | None = None, now: float | None = None
    ) -> list[Lease]:
        if n <= 0:
            return []
        now = self._now(now)
        # one random base per claim; each lease's token is base XOR its task id (SQLite has no
        # XOR operator: a ^ b == (a | b) - (a & b)), so tokens differ per lease and per claim
        base = secrets.randbits(62)
        fit = ""
        params: list[Any] = [base, worker, now, now]
        if resources is not None:
            fit = " AND spec IN (SELECT id FROM specs WHERE cpus <= ? AND gpus <= ?)"
            params += [resources.cpus, resources.gpus]
        params.append(n)
        with self._tx() as db:
            db.execute(
                "INSERT INTO workers(id, started_at, heartbeat) VALUES (?,?,?)"
                " ON CONFLICT(id) DO UPDATE SET heartbeat=excluded.heartbeat, gone=0",
                (worker, now, now),
            )
            rows = db.execute(
                f"UPDATE tasks SET state={int(_S.CLAIMED)}, token=(?1 | id) - (?1 & id),"
                " worker=?2, claimed_at=?3,"
                " attempt=attempt+1"
                f" WHERE id IN (SELECT id FROM tasks WHERE state={_READY}"
                f" AND (ready_at IS NULL OR ready_at <= ?){fit}"
                " ORDER BY priority DESC, cost DESC, id LIMIT ?)"
                " RETURNING priority, cost, id, token, attempt, spec, args",
                params,
            ).fetchall()
        rows.sort(key=lambda r: (-r[0], -r[1], r[2]))
        return [Lease(r[2], r[3], r[4], r[5], r[6]) for r in rows]

    # --- leases held in the coordinator's memory (the local backend) ----------------------------
    # The local backend's coordinator is the run's only writer (it holds the run lock) and its
    # workers die with it, so it can keep leases in memory: a task costs one write when it ends
    # (plus one when it is seen running), not one more when it is leased. Tokens still guard
    # every commit: a task the user cancelled meanwhile, or one that was already committed,
    # turns the outcome into a stale attempt.

    def lease_ready(
        self,
        n: int,
        inflight: set[int],
        cursor: tuple[int, float, int] | None = None,
        resources: Resources | None = None,
        now: float | None = None,
    ) -> tuple[list[Lease], tuple[int, float, int] | None]:
        """Up to ``n`` ready tasks in claim order, leased in memory: nothing is written.

        ``inflight`` holds the ids the caller already leases (passed over). ``cursor`` is the
        order key of the caller's last lease: the search continues within that priority and
        cost from there, and from the top when that is used up (pass None after anything became
        ready again). Returns the leases and the new cursor.
        """
        now = self._now(now)
        fit, fit_params = "", []
        if resources is not None:
            fit = " AND spec IN (SELECT id FROM specs WHERE cpus <= ? AND gpus <= ?)"
            fit_params = [resources.cpus, resources.gpus]
        rows: list[tuple] = []
        if cursor is not None:
            rows = self.db.execute(
                f"SELECT priority, cost, id, attempt, spec, args FROM tasks WHERE state={_READY}"
                f" AND priority=? AND cost=? AND id>? AND (ready_at IS NULL OR ready_at<=?){fit}"
                " ORDER BY id LIMIT ?",
                [cursor[0], cursor[1], cursor[2], now, *fit_params, n],
            ).fetchall()
            if inflight and rows and rows[0][2] <= max(inflight):
                # the cursor can trail a task leased after a reset: pass over those
                rows = [r for r in rows if r[2] not in inflight]
        if len(rows) < n:
            taken = {r[2] for r in rows}
            picked: list[int] = []
            scan = self.db.execute(
                f"SELECT id FROM tasks INDEXED BY ix_ready WHERE state={_READY}"
                f" AND (ready_at IS NULL OR ready_at<=?){fit} ORDER BY priority DESC, cost DESC, id",
                [now, *fit_params],
            )
            want = n - len(rows)
            for (tid,) in scan:  # passes over at most the tasks in flight
                if tid in inflight or tid in taken:
                    continue
                picked.append(tid)
                if len(picked) >= want:
                    break
            scan.close()
            for chunk in _chunks(picked):
                rows += self.db.execute(
                    "SELECT priority, cost, id, attempt, spec, args FROM tasks"
                    f" WHERE id IN ({_qs(len(chunk))})",
                    chunk,
                ).fetchall()
            rows.sort(key=lambda r: (-r[0], -r[1], r[2]))
        if not rows:
            return [], cursor
        base = secrets.randbits(62)
        last = rows[-1]
        return (
            [Lease(r[2], base ^ r[2], r[3] + 1, r[4], r[5]) for r in rows],
            (last[0], last[1], last[2]),
        )

    def start_leased(self, worker: str, leases: Iterable[Lease], now: float | None = None) -> int:
        """Record that leases held in memory have started (READY -> CLAIMED -> RUNNING)."""
        now = self._now(now)
        with self._tx() as db:
            return db.executemany(
                f"UPDATE tasks SET state={int(_S.RUNNING)}, token=?, worker=?, attempt=?,"
                f" claimed_at=?, started_at=? WHERE id=? AND state={_READY} AND token IS NULL",
                ((lz.token, worker, lz.attempt, now, now, lz.task) for lz in leases),
            ).rowcount

    def finish_leased(
        self,
        worker: str,
        succeeded: Sequence[Sequence[Any]],
        others: Sequence[Finished] = (),
        now: float | None = None,
        outcome: Outcome = Outcome.SUCCEEDED,
    ) -> int:
        """Commit outcomes of leases held in memory; returns how many took effect.

        ``outcome`` is what the ``succeeded`` rows record: ``cached`` for results served by
        the result cache (they never ran).

        ``succeeded`` rows are ``(task, token, attempt, started_at, ended_at, result, worker)``
        (:data:`~pipefarm.task.SuccessRow`) of successes with a small result and nothing else to
        record; ``others`` are every other outcome. A task that is no longer ready-and-unleased nor running under this token
        gets a stale attempt instead.
        """
        now = self._now(now)
        applied = 0
        with self._tx() as db:
            if succeeded:
                def eligible(tok: int | None, st: int, f_token: int) -> bool:
                    return (st == _S.READY and tok is None) or (st == _S.RUNNING and tok == f_token)

                # rows carry the attempt's peak memory as an 8th value, or leave it out
                peak = ", peak_memory=?8" if len(succeeded[0]) > 7 else ""
                done = self._apply_or_stale(
                    db, worker,
                    f"UPDATE tasks SET state={int(_S.SUCCEEDED)}, outcome={int(outcome)},"
                    f" token=?2, attempt=?3, started_at=?4, ended_at=?5, result=?6, worker=?7{peak}"
                    f" WHERE id=?1 AND ((state={int(_S.READY)} AND token IS NULL)"
                    f" OR (state={int(_S.RUNNING)} AND token=?2))",
                    succeeded, 0, 1, eligible,
                    lambda: [Finished(r[0], r[1], int(outcome), r[3], r[4], r[5],
                                      attempt=r[2], peak_memory=r[7] if len(r) > 7 else None)
                             for r in succeeded],
                )
                applied += len(done)
                if self._has_deps:
                    self._release_dependents(db, done)
            if others:
                # the lease becomes a real one first, then the ordinary path applies
                db.executemany(
                    f"UPDATE tasks SET state={int(_S.RUNNING)}, token=?, worker=?, attempt=?,"
                    f" claimed_at=?, started_at=? WHERE id=? AND state={_READY} AND token IS NULL",
                    ((f.token, worker, f.attempt, now, f.started_at, f.task) for f in others),
                )
                wins = [f for f in others if f.outcome in states.SUCCESSFUL]
                if wins:
                    applied += self._finish_succeeded(db, worker, wins, now)
                for f in others:
                    if f.outcome not in states.SUCCESSFUL:
                        applied += self._finish_unsuccessful(db, worker, f, now)
        return applied

    def heartbeat(self, worker: str, now: float | None = None) -> None:
        now = self._now(now)
        with self._tx():
            self.db.execute(
                "INSERT INTO workers(id, started_at, heartbeat) VALUES (?,?,?)"
                " ON CONFLICT(id) DO UPDATE SET heartbeat=excluded.heartbeat",
                (worker, now, now),
            )

    def start(self, leases: Iterable[tuple[int, int]], now: float | None = None) -> int:
        now = self._now(now)
        with self._tx() as db:
            cur = db.executemany(
                f"UPDATE tasks SET state={int(_S.RUNNING)}, started_at=?"
                f" WHERE id=? AND token=? AND state IN {states.sql_in(State.RUNNING)}",
                ((now, t, tok) for t, tok in leases),
            )
            return cur.rowcount

    def finish(self, worker: str, outcomes: Iterable[Finished], now: float | None = None) -> int:
        now = self._now(now)
        outcomes = list(outcomes)
        if not outcomes:
            return 0
        wins = [f for f in outcomes if f.outcome in states.SUCCESSFUL]
        others = [f for f in outcomes if f.outcome not in states.SUCCESSFUL]
        applied = 0
        with self._tx() as db:  # result files of a transaction that fails are removed with it
            if wins:
                applied += self._finish_succeeded(db, worker, wins, now)
            for f in others:
                applied += self._finish_unsuccessful(db, worker, f, now)
        return applied

    def _result_columns(self, f: Finished) -> tuple[bytes | None, str | None]:
        if f.result is None or len(f.result) <= INLINE_RESULT_MAX or self.run_dir is None:
            return f.result, None
        rdir = self.run_dir / "results"
        name = f"{f.task}-{f.token:x}.pkl"
        tmp = rdir / (name + ".tmp")
        try:
            rdir.mkdir(mode=0o700, exist_ok=True)
            # private like the run directory: results may be confidential, and a pickle that
            # another user could replace would run their code when read back
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
                fh.write(f.result)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, rdir / name)
            self._tx_files.append(rdir / name)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(
                    f"the disk holding {self.run_dir} is full (writing a result file): nothing of"
                    " this write was saved; free some space and run again to resume"
                ) from exc
            raise
        return None, f"results/{name}"

    def _finish_succeeded(
        self, db: sqlite3.Connection, worker: str, wins: list[Finished], now: float
    ) -> int:
        # A worker reports start and end together: CLAIMED -> RUNNING -> SUCCEEDED in one write.
        src = f"({_S.CLAIMED},{_S.RUNNING})"
        kinds = {f.outcome for f in wins}  # succeeded, and cached (served by the result cache)
        if len(kinds) > 1:
            return sum(self._finish_succeeded(db, worker, [f for f in wins if f.outcome == k],
                                              now) for k in kinds)
        # Most outcomes are a small Python result and nothing else: bind five values, not ten.
        plain, full = [], []
        for f in wins:
            if f.exit_code is None and f.note is None and f.output is None and (
                f.result is None or len(f.result) <= INLINE_RESULT_MAX
            ):
                plain.append((f.result, f.started_at, f.ended_at, f.peak_memory, f.task, f.token))
            else:
                blob, rfile = self._result_columns(f)
                full.append((blob, rfile, f.started_at, f.ended_at, f.exit_code, f.note, f.output,
                             f.peak_memory, f.task, f.token))
        head = f"UPDATE tasks SET state={int(_S.SUCCEEDED)}, outcome={int(wins[0].outcome)},"
        where = f" WHERE id=? AND token=? AND state IN {src}"
        plain_sql = head + " result=?, started_at=?, ended_at=?, peak_memory=?" + where
        full_sql = (head + " result=?, result_file=?, started_at=?, ended_at=?, exit_code=?,"
                    " note=?, output=?, peak_memory=?" + where)

        def eligible(tok: int | None, st: int, f_token: int) -> bool:
            return tok == f_token and st in (_S.CLAIMED, _S.RUNNING)

        done: list[int] = []
        for sql, rows in ((plain_sql, plain), (full_sql, full)):
            if rows:
                done += self._apply_or_stale(db, worker, sql, rows, -2, -1, eligible,
                                             lambda: wins)
        if self._has_deps:
            self._release_dependents(db, done)
        return len(done)

    def _apply_or_stale(
        self, db: sqlite3.Connection, worker: str, sql: str, rows: list[Sequence[Any]],
        task_at: int, token_at: int, eligible: Any, outcomes: Callable[[], list[Finished]],
    ) -> list[int]:
        """Run a batched compare-and-set update; return the tasks it changed.

        When not every row matched, the batch is undone (savepoint) and applied again to the
        eligible rows only, the others becoming stale attempts: a duplicate of an outcome that
        already took effect must not count twice.
        """
        db.execute("SAVEPOINT batch")
        if db.executemany(sql, rows).rowcount == len(rows):
            db.execute("RELEASE batch")
            return [r[task_at] for r in rows]
        db.execute("ROLLBACK TO batch")
        current: dict[int, tuple[int | None, int]] = {}
        ids = [r[task_at] for r in rows]
        for chunk in _chunks(ids):
            for tid, tok, st in db.execute(
                f"SELECT id, token, state FROM tasks WHERE id IN ({_qs(len(chunk))})", chunk
            ):
                current[tid] = (tok, st)
        good = [r for r in rows if eligible(*current.get(r[task_at], (None, -1)), r[token_at])]
        db.executemany(sql, good)
        db.execute("RELEASE batch")
        applied = {r[task_at] for r in good}
        by_task = {f.task: f for f in outcomes()}
        for r in rows:
            if r[task_at] not in applied:
                self._insert_stale(db, worker, by_task[r[task_at]])
        return [r[task_at] for r in good]

    def _insert_stale(self, db: sqlite3.Connection, worker: str, f: Finished) -> None:
        db.execute(
            "INSERT INTO attempts(task, attempt, worker, token, outcome, started_at, ended_at,"
            " exit_code, error, note, output, peak_memory) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                f.task, f.attempt, worker, f.token, int(Outcome.STALE), f.started_at, f.ended_at,
                f.exit_code, f.error,
                f"stale: lease superseded ({Outcome(f.outcome).label} ignored)"
                + (f"; {f.note}" if f.note else ""),
                f.output, f.peak_memory,
            ),
        )

    def _archive_current(self, db: sqlite3.Connection, task: int) -> None:
        """Copy the attempt held in the task row into ``attempts``."""
        db.execute(
            "INSERT INTO attempts(task, attempt, worker, token, outcome, started_at, ended_at,"
            " exit_code, error, note, output, peak_memory) SELECT id, attempt, worker, token,"
            " outcome, started_at, ended_at, exit_code, error, note, output, peak_memory FROM tasks"
            " WHERE id=? AND outcome IS NOT NULL",
            (task,),
        )

    def _finish_unsuccessful(
        self, db: sqlite3.Connection, worker: str, f: Finished, now: float
    ) -> int:
        row = db.execute(
            "SELECT t.state, t.token, t.failures, t.lost, s.max_attempts, s.max_lost, s.backoff"
            " FROM tasks t JOIN specs s ON s.id = t.spec WHERE t.id=?",
            (f.task,),
        ).fetchone()
        if row is None or row[1] != f.token or row[0] not in (_S.CLAIMED, _S.RUNNING):
            self._insert_stale(db, worker, f)
            return 0
        st, _, failures, lost, max_attempts, max_lost, backoff = row
        outcome = Outcome(f.outcome)
        if outcome == Outcome.RELEASED:
            self._release_one(db, f.task, st, now, f)
            return 1
        if outcome in states.SPENDS_RETRY:
            failures += 1
        elif outcome == Outcome.LOST:
            lost += 1
        nxt = states.after_attempt(outcome, failures, max_attempts, lost, max_lost)
        states.check(State.RUNNING, nxt)
        ready_at = now + states.backoff_delay(backoff, failures) if nxt == State.READY else None
        # a failure's result is the pickled exception (kept so callers get the original back)
        blob = f.result if f.result is None or len(f.result) <= INLINE_RESULT_MAX else None
        db.execute(
            "UPDATE tasks SET outcome=?, started_at=coalesce(?, started_at), ended_at=?,"
            " exit_code=?, error=?, note=?, output=?, failures=?, lost=?, result=?, peak_memory=?"
            " WHERE id=?",
            (
                int(outcome), f.started_at, f.ended_at, f.exit_code, f.error, f.note, f.output,
                failures, lost, blob, f.peak_memory, f.task,
            ),
        )
        self._end_attempt(db, f.task, nxt, ready_at)
        return 1

    def _end_attempt(
        self, db: sqlite3.Connection, task: int, nxt: State, ready_at: float | None
    ) -> None:
        """The attempt in the row has ended: archive it if the task goes on, else keep it."""
        if nxt == State.READY:
            self._archive_current(db, task)
            db.execute(
                f"UPDATE tasks SET state={int(_S.READY)}, ready_at=?, token=NULL, worker=NULL,"
                " outcome=NULL, started_at=NULL, ended_at=NULL, exit_code=NULL, error=NULL,"
                " note=NULL, output=NULL, result=NULL, peak_memory=NULL WHERE id=?",
                (ready_at, task),
            )
        else:  # the attempt stays in the row, token included (attempts() reports it)
            db.execute(f"UPDATE tasks SET state={int(nxt)} WHERE id=?", (task,))
            if self._has_deps:
                self._skip_dependents(db, [task])

    def _release_one(
        self, db: sqlite3.Connection, task: int, st: int, now: float, f: Finished | None = None
    ) -> None:
        if st == _S.CLAIMED:  # never started: as if it had not been claimed
            db.execute(
                f"UPDATE tasks SET state={int(_S.READY)}, attempt=attempt-1, token=NULL,"
                " worker=NULL, claimed_at=NULL WHERE id=?",
                (task,),
            )
            return
        db.execute(
            "UPDATE tasks SET outcome=?, ended_at=?, note=?, peak_memory=? WHERE id=?",
            (
                int(Outcome.RELEASED), now,
                (f.note if f is not None and f.note else "released: stopped by a known cause"),
                f.peak_memory if f is not None else None, task,
            ),
        )
        self._end_attempt(db, task, State.READY, None)

    def release(self, worker: str, leases: Iterable[tuple[int, int]], now: float | None = None) -> int:
        now = self._now(now)
        n = 0
        with self._tx() as db:
            for task, token in leases:
                row = db.execute("SELECT state, token FROM tasks WHERE id=?", (task,)).fetchone()
                if row is None or row[1] != token or row[0] not in (_S.CLAIMED, _S.RUNNING):
                    continue
                self._release_one(db, task, row[0], now)
                n += 1
        return n

    def reap(self, now: float | None = None, *, workers: Iterable[str] | None = None) -> int:
        now = self._now(now)
        n = 0
        with self._tx() as db:
            dead = {
                w for (w,) in db.execute(
                    "SELECT id FROM workers WHERE heartbeat < ? AND gone = 0",
                    (now - self.lease_s,),
                )
            }
            dead.update(workers or ())
            if not dead:
                return 0
            for chunk in _chunks(sorted(dead)):
                held = db.execute(
                    "SELECT t.id, t.state, t.lost, t.failures, s.max_attempts, s.max_lost"
                    f" FROM tasks t JOIN specs s ON s.id=t.spec WHERE t.state IN {_ACTIVE}"
                    f" AND t.worker IN ({_qs(len(chunk))})",
                    chunk,
                ).fetchall()
                for tid, st, lost, failures, max_attempts, max_lost in held:
                    n += 1
                    if st == _S.CLAIMED:
                        self._release_one(db, tid, st, now)
                        continue
                    lost += 1
                    nxt = states.after_attempt(Outcome.LOST, failures, max_attempts, lost, max_lost)
                    db.execute(
                        "UPDATE tasks SET outcome=?, ended_at=?, lost=?, error=? WHERE id=?",
                        (
                            int(Outcome.LOST), now, lost,
                            "lost: its worker stopped heartbeating (killed, or its host lost)"
                            if nxt == State.READY
                            else f"lost {lost} times: its worker died each time",
                            tid,
                        ),
                    )
                    self._end_attempt(db, tid, nxt, None)
                db.execute(
                    f"UPDATE workers SET gone=1 WHERE id IN ({_qs(len(chunk))})", chunk
                )
        return n

    # --- dependencies ----------------------------------------------------------------------------
    def _release_dependents(self, db: sqlite3.Connection, done: Sequence[int]) -> None:
        """Tasks in ``done`` succeeded: count them off their dependents, unblock those at 0."""
        touched: list[int] = []
        for chunk in _chunks(list(done)):
            kids = db.execute(
                f"SELECT task FROM deps WHERE dep IN ({_qs(len(chunk))})", chunk
            ).fetchall()
            if kids:
                db.executemany("UPDATE tasks SET ndeps = ndeps - 1 WHERE id = ?", kids)
                touched.extend(k for (k,) in kids)
        for chunk in _chunks(sorted(set(touched))):
            db.execute(
                f"UPDATE tasks SET state={int(_S.READY)} WHERE id IN ({_qs(len(chunk))})"
                f" AND state={int(_S.BLOCKED)} AND ndeps <= 0",
                chunk,
            )

    def _skip_dependents(self, db: sqlite3.Connection, ended: Sequence[int]) -> None:
        """Tasks in ``ended`` ended unsuccessfully: skip every task that waits on them."""
        frontier = list(ended)
        while frontier:
            nxt: list[int] = []
            for chunk in _chunks(frontier):
                nxt.extend(
                    t for (t,) in db.execute(
                        f"UPDATE tasks SET state={int(_S.SKIPPED)}, ready_at=NULL WHERE state={int(_S.BLOCKED)}"
                        f" AND id IN (SELECT task FROM deps WHERE dep IN ({_qs(len(chunk))}))"
                        " RETURNING id",
                        chunk,
                    )
                )
            frontier = nxt

    # --- user actions ----------------------------------------------------------------------------
    def cancel(self, ids: Iterable[int] | None = None) -> int:
        src = states.sql_in(State.CANCELLED)
        with self._tx() as db:
            if ids is None:
                changed = [
                    t for (t,) in db.execute(
                        f"UPDATE tasks SET state={int(_S.CANCELLED)}, token=NULL"
                        f" WHERE state IN {src} RETURNING id"
                    )
                ]
            else:
                changed = []
                for chunk in _chunks(sorted(set(ids))):
                    changed += [
                        t for (t,) in db.execute(
                            f"UPDATE tasks SET state={int(_S.CANCELLED)}, token=NULL"
                            f" WHERE state IN {src} AND id IN ({_qs(len(chunk))}) RETURNING id",
                            chunk,
                        )
                    ]
            if self._has_deps and changed:
                self._skip_dependents(db, changed)
        return len(changed)

    def retry(self, ids: Iterable[int] | None = None, *, failed_only: bool = True) -> int:
        with self._tx() as db:
            if ids is not None:
                wanted = sorted(set(ids))
                targets = []
                for chunk in _chunks(wanted):
                    targets += [
                        t for (t,) in db.execute(
                            f"SELECT id FROM tasks WHERE state IN {_TERMINAL}"
                            f" AND id IN ({_qs(len(chunk))})",
                            chunk,
                        )
                    ]
            else:
                which = f"({int(_S.FAILED)})" if failed_only else _UNSUCCESSFUL
                targets = [t for (t,) in db.execute(f"SELECT id FROM tasks WHERE state IN {which}")]
            for t in targets:
                self._archive_current(db, t)
            for chunk in _chunks(targets):
                db.execute(
                    "UPDATE tasks SET failures=0, lost=0, outcome=NULL, token=NULL, worker=NULL,"
                    " ready_at=NULL, result=NULL, result_file=NULL, error=NULL, note=NULL,"
                    " exit_code=NULL, output=NULL, started_at=NULL, ended_at=NULL, peak_memory=NULL,"
                    f" state={int(_S.BLOCKED)} WHERE id IN ({_qs(len(chunk))})",
                    chunk,
                )
            if self._has_deps:
                self._revive_skipped(db)
                # a revived task that still waits on an unsuccessful dependency is skipped
                again = [t for (t,) in db.execute(
                    f"UPDATE tasks SET state={int(_S.SKIPPED)} WHERE state={int(_S.BLOCKED)}"
                    " AND EXISTS (SELECT 1 FROM deps d JOIN tasks p ON p.id = d.dep"
                    f" WHERE d.task = tasks.id AND p.state IN {_UNSUCCESSFUL}) RETURNING id"
                )]
                self._skip_dependents(db, again)
            self._settle_blocked(db)
        return len(targets)

    def _revive_skipped(self, db: sqlite3.Connection) -> None:
        """Skipped tasks none of whose dependencies ended unsuccessfully go back to blocked."""
        while True:
            revived = db.execute(
                f"UPDATE tasks SET state={int(_S.BLOCKED)} WHERE state={int(_S.SKIPPED)}"
                " AND NOT EXISTS (SELECT 1 FROM deps d JOIN tasks p ON p.id = d.dep"
                f" WHERE d.task = tasks.id AND p.state IN {_UNSUCCESSFUL}) RETURNING id"
            ).fetchall()
            if not revived:
                return

    def _settle_blocked(self, db: sqlite3.Connection) -> None:
        """Recount pending dependencies of blocked tasks; those with none become ready."""
        db.execute(
            "UPDATE tasks SET ndeps = (SELECT count(*) FROM deps d JOIN tasks p ON p.id = d.dep"
            f" WHERE d.task = tasks.id AND p.state != {int(_S.SUCCEEDED)})"
            f" WHERE state = {int(_S.BLOCKED)}"
        )
        db.execute(
            f"UPDATE tasks SET state={int(_S.READY)} WHERE state={int(_S.BLOCKED)} AND ndeps=0"
        )

    def forget(self, ids: Iterable[int]) -> int:
        """Delete finished tasks (the in-memory Executor store, once their futures are set)."""
        n = 0
        with self._tx() as db:
            for chunk in _chunks(sorted(set(ids))):
                n += db.execute(
                    f"DELETE FROM tasks WHERE state IN {_TERMINAL} AND id IN ({_qs(len(chunk))})",
                    chunk,
                ).rowcount
        return n

    def ready_cache_keys(self, now: float | None = None) -> list[tuple[int, int, int, bytes]]:
        """``(task, attempt, spec, cache key)`` of the ready tasks that have a key, in one
        query (the coordinator serves the cached ones before it starts a worker)."""
        return self.db.execute(
            "SELECT id, attempt, spec, cache_key FROM tasks INDEXED BY ix_ready"
            f" WHERE state = {_READY} AND cache_key IS NOT NULL"
            " AND (ready_at IS NULL OR ready_at <= ?)",
            (self._now(now),)).fetchall()

    def cache_keys(self, ids: Sequence[int]) -> dict[int, bytes]:
        """``{task: cache key}`` of those of ``ids`` that have one."""
        found: dict[int, bytes] = {}
        for chunk in _chunks(list(ids)):
            found.update(self.db.execute(
                f"SELECT id, cache_key FROM tasks WHERE id IN ({_qs(len(chunk))})"
                " AND cache_key IS NOT NULL", chunk))
        return found

    def pending_spec_resources(self) -> list[tuple[int, int, int]]:
        """``(spec, cpus, gpus)`` for specs that still have unfinished tasks."""
        return self.db.execute(
            "SELECT s.id, s.cpus, s.gpus FROM specs s WHERE EXISTS (SELECT 1 FROM tasks t"
            f" WHERE t.spec = s.id AND t.state NOT IN {_TERMINAL})"
        ).fetchall()

    def has_deps(self) -> bool:
        """Whether any task of this catalog has dependencies (read once at open, kept by
        :meth:`add_tasks`)."""
        return self._has_deps

    def next_ready_at(self) -> float | None:
        """The earliest time a task now in backoff becomes claimable."""
        row = self.db.execute(
            f"SELECT min(ready_at) FROM tasks WHERE state={_READY} AND ready_at IS NOT NULL"
        ).fetchone()
        return row[0]

    # -- writes for the shared-filesystem fold --
    def ensure_tables(self, name: str, ddl: str) -> None:
        """Create another layer's own tables in this catalog, once per store object: ``ddl``
        is ``CREATE ... IF NOT EXISTS`` statements separated by ``;``, ``name`` says whose
        they are (the shared-filesystem fold keeps its bookkeeping this way)."""
        done = self.__dict__.setdefault("_ensured_tables", set())
        if name in done:
            return
        with self._tx() as db:
            for stmt in ddl.split(";"):
                if stmt.strip():
                    db.execute(stmt)
        done.add(name)

    def claim_with_tokens(self, rows: Iterable[tuple[int, int, str]],
                          now: float | None = None) -> int:
        """Claim tasks under tokens made elsewhere (the shared-filesystem protocol's claim
        files are the tokens): ``(task, token, worker)`` each, only where the task's state may
        become claimed. Returns the number claimed."""
        t = self._now(now)
        with self._tx() as db:
            return db.executemany(
                f"UPDATE tasks SET state={int(State.CLAIMED)}, token=?, worker=?, claimed_at=?,"
                " attempt=attempt+1, ready_at=NULL"
                f" WHERE id=? AND state IN {states.sql_in(State.CLAIMED)}",
                [(token, worker, t, task) for task, token, worker in rows],
            ).rowcount

    def mark_running(self, rows: Iterable[tuple[int, int, float]]) -> int:
        """Claimed -> running for ``(task, token, started_at)`` where the token still matches
        (starts journaled by workers on other hosts). Returns the number started."""
        with self._tx() as db:
            return db.executemany(
                f"UPDATE tasks SET state={int(State.RUNNING)}, started_at=?"
                f" WHERE id=? AND token=? AND state IN {states.sql_in(State.RUNNING)}",
                [(started_at, task, token) for task, token, started_at in rows],
            ).rowcount

    def set_result_files(self, rows: Iterable[tuple[int, int, str]]) -> int:
        """Name the file that holds a succeeded task's (large) result, written by a worker on
        another host: ``(task, token, path relative to the run)`` where the token matches."""
        with self._tx() as db:
            return db.executemany(
                f"UPDATE tasks SET result_file=? WHERE id=? AND token=? AND state={int(State.SUCCEEDED)}",
                [(path, task, token) for task, token, path in rows],
            ).rowcount


def _remembering(pairs: Iterator[tuple[bytes | None, str | None]],
                 last: list[str | None]) -> Iterator[tuple[bytes | None, str | None]]:
    """The pairs unchanged, with the key of the latest one kept in ``last[0]``."""
    for pair in pairs:
        last[0] = pair[1]
        yield pair

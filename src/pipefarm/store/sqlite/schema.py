"""The SQLite catalog's shape: its DDL, the pragmas a writer opens it with, the upgrade of
catalogs written by older pipefarms, and the SQL text constants (state sets, chunked ``IN``
lists) that the write side (:mod:`.store`) and the read side (:mod:`.query`) share.
"""

from __future__ import annotations

import sqlite3
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from ... import states
from ...states import State

SCHEMA_VERSION = 1


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS specs(
  id INTEGER PRIMARY KEY, kind TEXT NOT NULL, payload BLOB NOT NULL,
  max_attempts INTEGER NOT NULL, timeout REAL, backoff REAL NOT NULL, max_lost INTEGER NOT NULL,
  cpus INTEGER NOT NULL, gpus INTEGER NOT NULL, memory INTEGER, tags TEXT, name TEXT,
  options BLOB);
CREATE TABLE IF NOT EXISTS tasks(
  id INTEGER PRIMARY KEY,
  spec INTEGER NOT NULL,
  args BLOB,
  key TEXT,
  state INTEGER NOT NULL,
  priority INTEGER NOT NULL DEFAULT 0,
  cost REAL NOT NULL DEFAULT 0,
  ndeps INTEGER NOT NULL DEFAULT 0,      -- dependencies not yet succeeded
  children INTEGER NOT NULL DEFAULT 0,   -- tasks that depend on this one
  attempt INTEGER NOT NULL DEFAULT 0,    -- number of the latest attempt
  failures INTEGER NOT NULL DEFAULT 0,   -- failed + timed-out attempts (the retry budget)
  lost INTEGER NOT NULL DEFAULT 0,       -- lost attempts (their own budget)
  ready_at REAL,                         -- backoff: not claimable before this time
  token INTEGER, worker TEXT, claimed_at REAL, started_at REAL, ended_at REAL,
  outcome INTEGER,                       -- of the current attempt, NULL when none is in the row
  exit_code INTEGER, error TEXT, note TEXT, output TEXT,
  result BLOB, result_file TEXT,
  peak_memory INTEGER,                   -- of the current attempt, bytes
  cache_key BLOB);                       -- the result cache's key (tasks submitted with cache)
CREATE INDEX IF NOT EXISTS ix_ready ON tasks(priority DESC, cost DESC, id, ready_at) WHERE state = {READY};
CREATE TABLE IF NOT EXISTS deps(dep INTEGER NOT NULL, task INTEGER NOT NULL,
  PRIMARY KEY(dep, task)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS attempts(
  task INTEGER NOT NULL, attempt INTEGER NOT NULL, worker TEXT, token INTEGER,
  outcome INTEGER NOT NULL, started_at REAL, ended_at REAL, exit_code INTEGER,
  error TEXT, note TEXT, output TEXT, peak_memory INTEGER);
CREATE INDEX IF NOT EXISTS ix_attempts ON attempts(task);
CREATE INDEX IF NOT EXISTS ix_cached ON tasks(outcome) WHERE outcome = {CACHED};
CREATE TABLE IF NOT EXISTS workers(
  id TEXT PRIMARY KEY, host TEXT, pid INTEGER, started_at REAL, heartbeat REAL, gone INTEGER DEFAULT 0);
""".replace("{READY}", str(int(State.READY))).replace("{CACHED}", str(int(states.Outcome.CACHED)))

_S = State
_READY = int(State.READY)
_SUCCEEDED = int(State.SUCCEEDED)


_in = states.sql_list


_TERMINAL = _in(states.TERMINAL)
_UNSUCCESSFUL_STATES = frozenset(int(s) for s in states.UNSUCCESSFUL_END)
_UNSUCCESSFUL = _in(states.UNSUCCESSFUL_END)
_ACTIVE = _in(states.ACTIVE)
_CHUNK = 500  # ids per "IN (...)" list: well under SQLite's parameter limit


#: The views' index (observe/: counts by state, running tasks, recent ends, throughput,
#: failures): reads of a finished 1,000,000-task run go from full scans (~0.2-0.9 s each) to
#: index ranges. Kept up during a run it made W1 6-11 % slower end to end (a partial one, on
#: ended rows only, 6 %), and a view may not slow the run it watches: so a view builds it on a
#: run nothing executes (:func:`build_views_index`, ~0.7 s per 1,000,000 tasks, once) and
#: ``Run.execute`` drops it before it starts.
VIEWS_INDEX = "ix_views"
VIEWS_INDEX_DDL = f"CREATE INDEX IF NOT EXISTS {VIEWS_INDEX} ON tasks(state, ended_at)"


def build_views_index(run_dir: str | Path, idle: Callable[[], bool]) -> bool:
    """Build :data:`VIEWS_INDEX` in ``RUN/catalog.db`` unless it is there; whether it is now.

    ``idle()`` is asked while holding the catalog's write lock, so a run that starts at that
    moment either finds the index (and drops it) or is seen and the build is left. A catalog
    this user cannot write, or one busy writing, just stays without it (the views then scan).
    """
    path = Path(run_dir) / "catalog.db"
    find = "SELECT 1 FROM sqlite_master WHERE type='index' AND name=?"
    try:  # looked for read-only first: a writer's connection touches the WAL (a new version)
        ro = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.05)
        try:
            if ro.execute(find, (VIEWS_INDEX,)).fetchone():
                return True
        finally:
            ro.close()
    except sqlite3.Error:
        return False
    if not idle():  # asked before the write lock too: never contend with a live run's writer
        return False
    try:
        db = sqlite3.connect(path, timeout=0.05, isolation_level=None)
    except sqlite3.Error:
        return False
    try:
        db.execute("BEGIN IMMEDIATE")
        if not idle():
            db.execute("ROLLBACK")
            return False
        db.execute(VIEWS_INDEX_DDL)
        db.execute("COMMIT")
        return True
    except sqlite3.Error:
        return False
    finally:
        db.close()


class KeysNotUnique(UserWarning):
    """A catalog from an older pipefarm holds a key more than once (said once, at the first
    open that finds it); submission keeps working and returns the oldest task of a key."""


def _chunks(seq: Sequence[Any], n: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _qs(n: int) -> str:
    return ",".join("?" * n)



def set_write_pragmas(db: sqlite3.Connection, synchronous: str) -> None:
    """The pragmas of the run's one writer (readers keep SQLite's defaults)."""
    db.execute("PRAGMA journal_mode=WAL")
    # FULL: a committed result survives power loss too; commits are batched, so the
    # extra fsync costs little per task.
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.execute("PRAGMA cache_size=-16000")  # 16 MB: bounded, whatever the run size
    db.execute("PRAGMA temp_store=MEMORY")
    db.execute("PRAGMA wal_autocheckpoint=8192")  # fewer, larger checkpoints


#: Columns added after schema 1, as ``(table, column, type)``: a catalog written before them
#: gets them (NULL in old rows) when it is first opened for writing, so a newer pipefarm
#: resumes an older run. Append here; never reorder or remove.
ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("specs", "options", "BLOB"),  # msgpack of the Spec fields newer than the columns above
    ("tasks", "peak_memory", "INTEGER"),
    ("attempts", "peak_memory", "INTEGER"),
    ("tasks", "cache_key", "BLOB"),  # the result cache's key (pipefarm.cache)
)


def columns(db: sqlite3.Connection, table: str) -> set[str]:
    """The names of ``table``'s columns in this catalog."""
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def create(db: sqlite3.Connection) -> None:
    """Create what is missing (inside the caller's write transaction), added columns too."""
    for stmt in _SCHEMA.split(";"):
        if stmt.strip():
            db.execute(stmt)
    have: dict[str, set[str]] = {}
    for table, column, kind in ADDED_COLUMNS:
        if table not in have:
            have[table] = columns(db, table)
        if column not in have[table]:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    db.execute("INSERT OR IGNORE INTO meta VALUES('schema', ?)", (SCHEMA_VERSION,))
    db.execute("INSERT OR IGNORE INTO meta VALUES('created_at', ?)", (time.time(),))


def ensure_key_index(
db: sqlite3.Connection,
tx: Callable[[], AbstractContextManager[sqlite3.Connection]],
create: bool,
where: Path | None,
) -> bool:
    """Whether keys are unique in this catalog; make them so when it can.

    Catalogs written before keys were unique get the unique index when they are first
    opened for writing. If old duplicates make that impossible, a plain index keeps key
    lookups fast, submission keeps working (a key returns its oldest task), and a warning
    says so once: the plain index marks that it was said.
    """
    def indexes() -> set[str]:
        return {n for (n,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type='index' AND tbl_name='tasks'")}

    have = indexes()
    if "ux_tasks_key" in have:
        return True
    if "ix_tasks_key" in have or not create:
        return False
    with tx() as db:
        have = indexes()  # again under the write lock: another process may have done it
        if "ux_tasks_key" in have or "ix_tasks_key" in have:
            return "ux_tasks_key" in have
        db.execute("SAVEPOINT key_index")
        try:
            db.execute("CREATE UNIQUE INDEX ux_tasks_key ON tasks(key) WHERE key IS NOT NULL")
            db.execute("RELEASE key_index")
            return True
        except sqlite3.IntegrityError:
            db.execute("ROLLBACK TO key_index")
            db.execute("RELEASE key_index")
        db.execute("CREATE INDEX ix_tasks_key ON tasks(key) WHERE key IS NOT NULL")
        key, n = db.execute(
            "SELECT key, count(*) FROM tasks WHERE key IS NOT NULL GROUP BY key"
            " HAVING count(*) > 1 LIMIT 1").fetchone()

    warnings.warn(
        f"{where or 'this catalog'}: key {key!r} is used by {n} tasks (written by an"
        " older pipefarm), so keys cannot be made unique here; submitting a key that is"
        " already used more than once returns its oldest task",
        KeysNotUnique, stacklevel=4,
    )
    return False

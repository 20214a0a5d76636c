"""The fold's own bookkeeping tables in the catalog, and the small SQL helpers the catalog side
of the protocol (:mod:`.folding`, :mod:`.exporting`, :mod:`.fence`) shares.

The tables are created through :meth:`SQLiteStore.ensure_tables` (``CREATE ... IF NOT
EXISTS``; the SQLite store's own schema does not know them). Only this package writes them;
the ``tasks`` and ``attempts`` rows change only through the store's methods.

The tables:

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
``fs_block_time(id, need_s)``
    the time (seconds) each task of an exported block asked for (its spec's ``time_request``),
    for blocks that asked: written with the block, offered to workers in ``fs/wave``.
``fs_children(id, parent, parent_epoch, cut)``
    child blocks made by workers' splits (see :mod:`.claimant`), once the catalog learns of
    them: from a worker's ``Claimed`` of the child, or from the cut slots a fence seals. The
    child's tasks then move from the parent's rows of ``fs_export`` to the child's, and leases
    held under the parent's token end (released: they never started there) when the child's
    claim is applied.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ... import states
from ..sqlite import SQLiteStore

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
CREATE TABLE IF NOT EXISTS fs_block_time(id INTEGER PRIMARY KEY, need_s REAL NOT NULL);
CREATE TABLE IF NOT EXISTS fs_children(
  id INTEGER PRIMARY KEY, parent INTEGER NOT NULL, parent_epoch INTEGER NOT NULL,
  cut INTEGER NOT NULL);
"""


#: rows per ``IN (...)`` list: far below SQLite's limit of bound parameters
CHUNK = 500
#: the states of a task held under a lease (claimed or running), for SQL
ACTIVE_SQL = states.sql_list(states.ACTIVE)


def chunks(seq: Sequence, n: int = CHUNK) -> Iterable[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def qs(n: int) -> str:
    """``n`` SQL placeholders."""
    return ",".join("?" * n)


def ensure_schema(catalog: SQLiteStore) -> None:
    """Add the protocol's tables to a catalog (idempotent, once per store object)."""
    catalog.ensure_tables("shared_fs", SCHEMA)


def open_blocks(catalog: SQLiteStore) -> int:
    """How many exported blocks are not closed yet (held, or waiting to be claimed)."""
    ensure_schema(catalog)
    return catalog.db.execute("SELECT count(*) FROM fs_blocks WHERE closed=0").fetchone()[0]


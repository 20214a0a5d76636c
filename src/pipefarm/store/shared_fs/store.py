"""The :class:`~pipefarm.store.base.Store` interface over the shared-filesystem protocol, in
the process that holds the catalog: :class:`FsJournalStore`.

It simulates workers faithfully through the protocol's files and folds them into an
:class:`~pipefarm.store.sqlite.SQLiteStore` catalog, which answers queries and makes every
decision; it also drives the catalog side of array runs (:meth:`FsJournalStore.pump`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ... import states
from ...states import State
from ...task import Finished, Lease, Resources, Spec
from ..base import DEFAULT_LEASE_S, AttemptRow, Store, TaskRow
from ..journal import Claimed, JournalWriter, Released, Started
from ..sqlite import SQLiteStore, StoreError
from .exporting import export as export_wave
from .exporting import export_block, pick_ready, unexport
from .fence import reap_blocks, recall_blocks
from .folding import drop_terminal_exports
from .folding import fold as fold_journals
from .foldlock import FoldLock
from .layout import Layout, check_worker_id, ended_record, new_worker_id, write_config
from .primitives import Liveness, create_excl, encode, server_now_ns, to_ns, token_of, touch
from .tables import ensure_schema


class FsJournalStore(Store):
    """The :class:`Store` interface over the shared-filesystem protocol, in the process that
    holds the catalog (``RUN/catalog.db``, an :class:`SQLiteStore`).

    Every worker named in the lease protocol is simulated faithfully: it has its own journal and
    heartbeat file; :meth:`claim` exports a block and creates its claim file; :meth:`start`,
    :meth:`finish` and :meth:`release` append journal records; and every call then folds the
    journals into the catalog, which answers the queries and makes every decision with the
    SQLite store's state machine. Real workers (:class:`~.claimant.FsWorker`, driven by
    :mod:`pipefarm.backends.array.worker_loop` on any host) use the same files, so both can
    run against one run directory.

    Where it differs from the letter of the protocol, to keep the contract exact:

    * :meth:`claim` ``(worker, n)`` hands out exactly the best ``n`` claimable tasks as one new
      block claimed at epoch 0; tasks already offered in exported blocks are left to workers
      (use :meth:`recall` to take unclaimed, released and stale blocks back).
    * :meth:`release` takes the leases out of their block (they are claimable here at once),
      where a worker's drain leaves them in the block for the next claimant.
    * :meth:`reap` fences stale blocks (creates the next epoch as a tombstone) and turns their
      leases into ``lost``/released attempts in the catalog at once.
    * ``now``: heartbeats are stamped with ``now`` (``os.utime``) and expiry compares with
      ``now``; without it the file server's clock is used (our own heartbeat, freshly touched).
    * Simulated workers' journals are not fsynced: their records are folded into the catalog
      (``synchronous=FULL``) before the call returns.

    The catalog side for array runs: :meth:`pump` (fold, reap, export a wave) from the
    coordinator's loop; ``workers`` sizes the blocks.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        lease_s: float = DEFAULT_LEASE_S,
        *,
        workers: int = 8,
        fold_interval: float = 1.0,
        synchronous: str = "FULL",
    ) -> None:
        self.run_dir = Path(run_dir)
        self.lease_s = float(lease_s)
        self.workers = max(1, int(workers))
        self.fold_interval = fold_interval
        self.layout = Layout(run_dir)
        self.layout.make()
        self.catalog = SQLiteStore(run_dir, lease_s=lease_s, synchronous=synchronous)
        ensure_schema(self.catalog)
        write_config(self.layout, self.lease_s)
        self.me = new_worker_id("catalog-")
        self._lock = FoldLock(self.layout, self.me, self.lease_s)
        self._writers: dict[str, JournalWriter] = {}
        self._dirty = True
        self._last_fold = float("-inf")
        self.last_fold: Any = None
        self._live = Liveness(self.lease_s)

    # --- plumbing --------------------------------------------------------------------------------
    def _append(self, worker: str, records: list[bytes]) -> None:
        if not records:
            return
        w = self._writers.get(worker)
        if w is None:
            check_worker_id(worker)
            w = self._writers[worker] = JournalWriter(self.layout.journal_of(worker), fsync=False)
        w.append(records)
        self._dirty = True

    def _fold(self, now: float | None = None, *, force: bool = False, need: bool = True) -> Any:
        if not (force or self._dirty or time.monotonic() - self._last_fold >= self.fold_interval):
            return None
        if self._lock.held and not self._lock.refresh():
            pass  # taken over while we were idle: take it back below, like a newcomer
        if not self._lock.held and not self._lock.acquire(wait=2 * self.lease_s if need else 0.0):
            if need:
                raise StoreError(
                    f"another process folds {self.run_dir} (see {self.layout.foldlock}); "
                    "only one process may hold the catalog of a shared-filesystem run"
                )
            return None
        stats = fold_journals(self.layout.run, self.catalog, now=now, lock=self._lock)
        if stats.skipped and need:
            raise StoreError(f"lost the fold lock of {self.run_dir} to another process")
        self._dirty = False
        self._last_fold = time.monotonic()
        self.last_fold = stats
        return stats

    def _ref_ns(self, now: float | None) -> int:
        if now is not None:
            return to_ns(now)
        return server_now_ns(self.layout.hb_of(self.me))

    def _rows(self, ids: Iterable[int]) -> dict[int, tuple]:
        out: dict[int, tuple] = {}
        ids = sorted(set(ids))
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            for r in self.catalog.db.execute(
                "SELECT id, token, state, worker, attempt FROM tasks WHERE id IN"
                f" ({','.join('?' * len(chunk))})",
                chunk,
            ):
                out[r[0]] = r[1:]
        return out

    # --- submission ------------------------------------------------------------------------------
    def add_spec(self, spec: Spec) -> int:
        return self.catalog.add_spec(spec)

    def spec(self, spec_id: int) -> Spec:
        return self.catalog.spec(spec_id)

    def add_tasks(self, spec_id, args, *, keys=None, priority=0, cost=0.0, after=()) -> range:
        return self.catalog.add_tasks(
            spec_id, args, keys=keys, priority=priority, cost=cost, after=after
        )

    # --- the lease protocol ----------------------------------------------------------------------
    def register_worker(self, worker: str, host: str, pid: int, now: float | None = None) -> None:
        check_worker_id(worker)
        self.catalog.register_worker(worker, host, pid, now=now)
        touch(self.layout.hb_of(worker), now)

    def heartbeat(self, worker: str, now: float | None = None) -> None:
        check_worker_id(worker)
        touch(self.layout.hb_of(worker), now)

    def claim(
        self, worker: str, n: int, resources: Resources | None = None, now: float | None = None
    ) -> list[Lease]:
        if n <= 0:
            return []
        self.heartbeat(worker, now)
        self._fold(now)
        t = time.time() if now is None else now
        with self.catalog.transaction():
            ids = pick_ready(self.catalog, n, resources, t)
            if not ids:
                return []
            b = export_block(self.layout, self.catalog, ids, t)
        if not create_excl(self.layout.claim(b, 0), worker.encode()):
            raise StoreError(f"block {b} of {self.run_dir} was claimed by someone else")
        self._append(worker, [encode(Claimed(b, 0, worker, t))])
        self._fold(now, force=True)
        chunk = ",".join("?" * len(ids))
        rows = [
            r for r in self.catalog.db.execute(
                "SELECT priority, cost, id, token, attempt, spec, args FROM tasks"
                f" WHERE id IN ({chunk}) AND state={int(State.CLAIMED)}",
                ids,
            ) if r[3] == token_of(b, 0, r[2])
        ]
        rows.sort(key=lambda r: (-r[0], -r[1], r[2]))
        return [Lease(r[2], r[3], r[4], r[5], r[6]) for r in rows]

    def start(self, leases: Iterable[tuple[int, int]], now: float | None = None) -> int:
        pairs = list(leases)
        if not pairs:
            return 0
        self._fold(now)
        rows = self._rows(t for t, _ in pairs)
        t = time.time() if now is None else now
        by_worker: dict[str, list[bytes]] = {}
        seen = set()
        for task, token in pairs:
            r = rows.get(task)
            if r is None or r[0] != token or r[1] != State.CLAIMED or task in seen or not r[2]:
                continue
            seen.add(task)
            by_worker.setdefault(r[2], []).append(encode(Started(task, token, r[3], r[2], t)))
        if not by_worker:
            return 0
        for w, recs in by_worker.items():
            self._append(w, recs)
        return self._fold(now, force=True).started

    def finish(self, worker: str, outcomes: Iterable[Finished], now: float | None = None) -> int:
        outs = list(outcomes)
        if not outs:
            return 0
        self._fold(now)
        self._append(worker, [encode(ended_record(self.layout, f)) for f in outs])
        return self._fold(now, force=True).ended

    def release(self, worker: str, leases: Iterable[tuple[int, int]], now: float | None = None) -> int:
        pairs = list(leases)
        if not pairs:
            return 0
        self._fold(now)
        rows = self._rows(t for t, _ in pairs)
        live = [t for t, tok in pairs if (r := rows.get(t)) is not None and r[0] == tok
                and r[1] in states.ACTIVE]
        self._append(worker, [encode(Released(t, tok)) for t, tok in pairs])
        n = self._fold(now, force=True).released
        if live:
            # handed back to the catalog, not to the block: claimable here at once
            with self.catalog.transaction():
                unexport(self.catalog, live)
        return n

    def reap(self, now: float | None = None, *, workers: Iterable[str] | None = None) -> int:
        self._fold(now)
        ref = self._ref_ns(now)
        with self.catalog.transaction():
            n = reap_blocks(
                self.layout, self.catalog, lease_s=self.lease_s, ref_ns=ref, now=now,
                workers=workers, me=self.me, liveness=None if now is not None else self._live,
            )
        return n

    # --- the catalog side (array runs) -----------------------------------------------------------
    def fold(self, now: float | None = None) -> Any:
        """Fold new journal records into the catalog now; returns a :class:`FoldStats`."""
        return self._fold(now, force=True)

    def export(self, now: float | None = None, *, workers: int | None = None, **kw: Any) -> Any:
        """Offer every claimable ready task as blocks (one wave); returns an ExportStats."""
        return export_wave(self.layout, self.catalog, workers=workers or self.workers,
                              now=now, **kw)

    def pump(self, now: float | None = None, **kw: Any) -> Any:
        """The coordinator's periodic step: fold, reap stale blocks, export a wave."""
        self._fold(now, force=True)
        self.reap(now)
        return self.export(now, **kw)

    def recall(self, now: float | None = None) -> int:
        """Take back every block that nobody holds alive (never claimed, released, stale):
        their tasks return to the catalog, claimable through :meth:`claim`."""
        self._fold(now)
        ref = self._ref_ns(now)
        with self.catalog.transaction():
            return recall_blocks(
                self.layout, self.catalog, lease_s=self.lease_s, ref_ns=ref, now=now,
                me=self.me, liveness=None if now is not None else self._live,
            )

    # --- user actions ----------------------------------------------------------------------------
    def cancel(self, ids: Iterable[int] | None = None) -> int:
        self._fold()
        with self.catalog.transaction():
            n = self.catalog.cancel(ids)
            drop_terminal_exports(self.catalog)
        return n

    def retry(self, ids: Iterable[int] | None = None, *, failed_only: bool = True) -> int:
        self._fold()
        with self.catalog.transaction():
            drop_terminal_exports(self.catalog)
            return self.catalog.retry(ids, failed_only=failed_only)

    # --- the query side --------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        self._fold(need=False)
        return self.catalog.counts()

    def tasks(self, state: str | None = None, ids: Iterable[int] | None = None,
              limit: int | None = None) -> list[TaskRow]:
        self._fold(need=False)
        return self.catalog.tasks(state, ids, limit)

    def attempts(self, task: int) -> list[AttemptRow]:
        self._fold(need=False)
        return self.catalog.attempts(task)

    def result(self, task: int) -> tuple[str, bytes | None, str | None]:
        self._fold(need=False)
        return self.catalog.result(task)

    def results(self) -> Iterable[tuple[Any, ...]]:
        self._fold(need=False)
        return self.catalog.results()

    def output_ref(self, task: int, attempt: int | None = None) -> str | None:
        self._fold(need=False)
        return self.catalog.output_ref(task, attempt)

    def size(self) -> int:
        return self.catalog.size()

    def close(self) -> None:
        for w in self._writers.values():
            with contextlib.suppress(OSError):
                w.close()
        self._writers.clear()
        with contextlib.suppress(OSError):
            self._lock.release()
        self.catalog.close()

"""The read side of the SQLite catalog: every query the store answers and the readers run.

:class:`CatalogQuery` holds the queries. :class:`~.store.SQLiteStore` inherits them (its query
side, on the writer's own connection); :meth:`CatalogQuery.open` gives a reader (``pipefarm
status``, ``show``, ``failures``, ``ls``, the result exports, ``observe/``) its own read-only
connection to ``RUN/catalog.db``: it takes no write lock, so it never blocks the run's one
writer (WAL: readers see the last committed state), and it cannot write by mistake. It is the
only door ``observe/`` has to the catalog.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ... import states
from ...states import Outcome, State
from ...task import PY, Resources, Spec, spec_options_of
from ..base import AttemptRow, TaskRow
from .schema import _S, _SUCCEEDED, VIEWS_INDEX, _chunks, _qs

#: the ``meta`` key listing the backends a run has executed on (comma-separated names)
BACKENDS_KEY = "backends_used"

#: the columns :func:`spec_of_row` reads, in its order
SPEC_COLS = ("kind, payload, max_attempts, timeout, backoff, max_lost, cpus, gpus, memory, tags,"
             " name, options")

#: how many of the latest ended tasks the recent mean duration (the ETA's) is taken over
RECENT_MEAN_TASKS = 1000

#: attempts that ended with a duration to measure (throughput and ETA)
_ENDED = states.sql_list({State.SUCCEEDED, State.FAILED})


def spec_of_row(row: Sequence[Any]) -> Spec:
    """A :class:`Spec` from a ``specs`` row read as :data:`SPEC_COLS`."""
    return Spec(
        kind=row[0], payload=row[1], max_attempts=row[2], timeout=row[3],
        backoff=row[4], max_lost=row[5],
        resources=Resources(cpus=row[6], gpus=row[7], memory=row[8]),
        tags=tuple(t for t in (row[9] or "").split(",") if t), name=row[10] or "",
        **spec_options_of(row[11] if len(row) > 11 else None),
    )


def select_spec(db: sqlite3.Connection, spec_id: int) -> Spec | None:
    """The spec with this id, or None; reads a catalog older than ``specs.options`` too (a
    reader cannot add the column)."""
    try:
        row = db.execute(f"SELECT {SPEC_COLS} FROM specs WHERE id=?", (spec_id,)).fetchone()
    except sqlite3.OperationalError:
        row = db.execute(f"SELECT {SPEC_COLS.rsplit(',', 1)[0]} FROM specs WHERE id=?",
                         (spec_id,)).fetchone()
    return None if row is None else spec_of_row(row)


class CatalogQuery:
    """Queries on one catalog connection (``db``); ``run_dir`` resolves result files (None for
    an in-memory catalog)."""

    db: sqlite3.Connection
    run_dir: Path | None

    @classmethod
    def open(cls, run_dir: str | os.PathLike[str]) -> CatalogQuery:
        """A read-only reader of ``RUN/catalog.db`` (``FileNotFoundError`` if there is none)."""
        path = Path(run_dir) / "catalog.db"
        if not path.exists():
            raise FileNotFoundError(f"no run at {run_dir} (no catalog.db there)")
        q = cls.__new__(cls)
        q.run_dir = Path(run_dir)
        q.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                               check_same_thread=False, timeout=30.0)
        q.db.execute("PRAGMA busy_timeout=30000")
        return q

    def close(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:
            pass

    def __enter__(self) -> CatalogQuery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def meta(self, key: str, default: Any = None) -> Any:
        """The run's ``meta`` value under ``key`` (``default`` when there is none)."""
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else row[0]

    def backends_used(self) -> list[str]:
        """The backends this run has executed on, first use first (``pipefarm status``)."""
        return [b for b in (self.meta(BACKENDS_KEY) or "").split(",") if b]

    def workers_not_gone(self) -> list[str]:
        """The ids of the workers the catalog does not know to be gone."""
        return [w for (w,) in self.db.execute("SELECT id FROM workers WHERE gone=0")]

    def left_of_specs(self, spec_ids: Sequence[int], limit: int) -> list[int]:
        """Up to ``limit`` ids of the tasks left (not ended) of these specs, lowest first."""
        return [r[0] for r in self.db.execute(
            f"SELECT id FROM tasks WHERE spec IN ({_qs(len(spec_ids))})"
            f" AND state IN {states.sql_list(states.LEFT)} ORDER BY id LIMIT ?",
            [*spec_ids, limit])]

    def spec(self, spec_id: int) -> Spec:
        """The spec with this id (``KeyError`` if there is none)."""
        spec = select_spec(self.db, spec_id)
        if spec is None:
            raise KeyError(f"no spec {spec_id}")
        return spec

    # --- the contract's query side (Store.counts, tasks, attempts, result, results) -----------------
    def counts(self) -> dict[str, int]:
        out = {s.label: 0 for s in State}
        for st, n in self.db.execute("SELECT state, count(*) FROM tasks GROUP BY state"):
            out[State(st).label] = n
        return out

    _TASK_COLS = (
        "id, key, state, attempt, failures, lost, priority, cost, worker, started_at, ended_at,"
        " exit_code, error, note, spec"
    )

    def _task_row(self, r: tuple) -> TaskRow:
        return TaskRow(
            id=r[0], key=r[1], state=State(r[2]).label, attempts=r[3], failures=r[4], lost=r[5],
            priority=r[6], cost=r[7], worker=r[8], started_at=r[9], ended_at=r[10],
            exit_code=r[11], error=r[12], note=r[13], spec=r[14],
        )

    def tasks(
        self, state: str | None = None, ids: Iterable[int] | None = None, limit: int | None = None
    ) -> list[TaskRow]:
        where, params = [], []
        if state is not None:
            where.append("state = ?")
            params.append(int(State[state.upper()]))
        lim = f" LIMIT {int(limit)}" if limit is not None else ""
        if ids is not None:
            out = []
            for chunk in _chunks(sorted(set(ids))):
                w = " AND ".join([*where, f"id IN ({_qs(len(chunk))})"])
                out += [
                    self._task_row(r)
                    for r in self.db.execute(
                        f"SELECT {self._TASK_COLS} FROM tasks WHERE {w} ORDER BY id", [*params, *chunk]
                    )
                ]
            return out[:limit] if limit is not None else out
        w = (" WHERE " + " AND ".join(where)) if where else ""
        return [
            self._task_row(r)
            for r in self.db.execute(f"SELECT {self._TASK_COLS} FROM tasks{w} ORDER BY id{lim}", params)
        ]

    def _peak_column(self) -> str:
        """``peak_memory``, or ``NULL`` on a catalog older than that column (a read-only
        reader cannot add it)."""
        col = getattr(self, "_peak_col", None)
        if col is None:
            names = {r[1] for r in self.db.execute("PRAGMA table_info(attempts)")}
            col = self._peak_col = "peak_memory" if "peak_memory" in names else "NULL"
        return col

    def attempts(self, task: int) -> list[AttemptRow]:
        peak = self._peak_column()
        rows = [
            AttemptRow(
                task=r[0], attempt=r[1], worker=r[2], token=r[3], outcome=Outcome(r[4]).label,
                started_at=r[5], ended_at=r[6], exit_code=r[7], error=r[8], note=r[9],
                peak_memory=r[10],
            )
            for r in self.db.execute(
                "SELECT task, attempt, worker, token, outcome, started_at, ended_at, exit_code,"
                f" error, note, {peak} FROM attempts WHERE task=? ORDER BY attempt, rowid",
                (task,),
            )
        ]
        cur = self.db.execute(
            "SELECT id, attempt, worker, token, outcome, started_at, ended_at, exit_code, error,"
            f" note, state, {peak} FROM tasks WHERE id=?",
            (task,),
        ).fetchone()
        if cur is not None and (cur[4] is not None or cur[10] in (_S.CLAIMED, _S.RUNNING)):
            label = Outcome(cur[4]).label if cur[4] is not None else State(cur[10]).label
            rows.append(
                AttemptRow(
                    task=cur[0], attempt=cur[1], worker=cur[2], token=cur[3], outcome=label,
                    started_at=cur[5], ended_at=cur[6], exit_code=cur[7], error=cur[8], note=cur[9],
                    peak_memory=cur[11],
                )
            )
        return rows

    def output_ref(self, task: int, attempt: int | None = None) -> str | None:
        """Where an attempt's output landed (``None`` if it printed nothing or is unknown)."""
        row = self.db.execute("SELECT attempt, output FROM tasks WHERE id=?", (task,)).fetchone()
        if row is None:
            raise KeyError(task)
        if attempt is None or attempt == row[0]:
            if row[1] is not None or attempt is not None:
                return row[1]
        q = "SELECT output FROM attempts WHERE task=? AND output IS NOT NULL"
        args: list[Any] = [task]
        if attempt is not None:
            q += " AND attempt=?"
            args.append(attempt)
        r = self.db.execute(q + " ORDER BY attempt DESC, rowid DESC LIMIT 1", args).fetchone()
        return None if r is None else r[0]

    def result(self, task: int) -> tuple[str, bytes | None, str | None]:
        row = self.db.execute(
            "SELECT state, result, result_file, error FROM tasks WHERE id=?", (task,)
        ).fetchone()
        if row is None:
            raise KeyError(f"no task {task}")
        blob = row[1]
        if row[2] is not None and self.run_dir is not None:
            blob = (self.run_dir / row[2]).read_bytes()
        return State(row[0]).label, blob, row[3]

    def results(self) -> Iterable[tuple[Any, ...]]:
        """``(id, key, state, attempt, exit_code, result, result_file, error, started_at,
        ended_at, worker, peak_memory, outcome)`` per task, in id order, streamed."""
        cur = self.db.execute(
            "SELECT id, key, state, attempt, exit_code, result, result_file, error, started_at,"
            f" ended_at, worker, {self._peak_column()}, outcome FROM tasks ORDER BY id"
        )
        while True:
            rows = cur.fetchmany(4096)
            if not rows:
                return
            yield from rows

    def export_rows(self) -> Iterable[tuple[Any, ...]]:
        """``(id, key, state, attempt, exit_code, result, result_file, error, started_at,
        ended_at, worker, spec, args, output, peak_memory, outcome)`` per task, in id order, one row at a
        time (an export of any size holds one row of the cursor in memory, not the run)."""
        cur = self.db.execute(
            "SELECT id, key, state, attempt, exit_code, result, result_file, error, started_at,"
            f" ended_at, worker, spec, args, output, {self._peak_column()}, outcome FROM tasks"
            " ORDER BY id"
        )
        yield from cur

    def has_python_tasks(self) -> bool:
        """Whether any task is a Python call (its arguments are pickles)."""
        return self.db.execute("SELECT 1 FROM specs WHERE kind=? LIMIT 1", (PY,)).fetchone() is not None

    def has_results(self) -> bool:
        """Whether any succeeded task holds a (pickled) result, inline or in a file."""
        return self.db.execute(
            f"SELECT 1 FROM tasks WHERE state={_SUCCEEDED} AND (result IS NOT NULL"
            " OR result_file IS NOT NULL) LIMIT 1").fetchone() is not None

    def ready_asking_more_than(self, seconds: float) -> int:
        """Ready tasks whose spec asks for more than ``seconds`` (``time_request``): what
        waits for an array worker with more walltime left."""
        asking = []
        for (sid,) in self.db.execute("SELECT id FROM specs"):
            need = self.spec(sid).time_request
            if need is not None and need > seconds:
                asking.append(sid)
        if not asking:
            return 0
        return self.db.execute(
            f"SELECT count(*) FROM tasks WHERE state={int(State.READY)}"
            f" AND spec IN ({_qs(len(asking))})", asking).fetchone()[0]

    def spec_rows(self) -> list[tuple[int, str, bytes]]:
        """``(id, kind, payload)`` of every spec (to render commands and name functions)."""
        return self.db.execute("SELECT id, kind, payload FROM specs ORDER BY id").fetchall()

    def task_detail(self, task: int) -> dict[str, Any]:
        """Every column of one task's row (``KeyError`` if there is none)."""
        cur = self.db.execute("SELECT * FROM tasks WHERE id=?", (task,))
        row = cur.fetchone()
        if row is None:
            raise KeyError(task)
        return dict(zip((d[0] for d in cur.description), row, strict=True))

    def attempt_outputs(self, task: int) -> dict[int, str | None]:
        """The output reference of each archived attempt of ``task``, by attempt number."""
        return dict(self.db.execute(
            "SELECT attempt, output FROM attempts WHERE task=? ORDER BY attempt, rowid", (task,)))

    def size(self) -> int:
        """Number of tasks."""
        return self.db.execute("SELECT count(*) FROM tasks").fetchone()[0]

    # --- what the readers ask (observe/) ---------------------------------------------------------
    def deps_of(self, task: int) -> list[int]:
        """The tasks ``task`` depends on, in id order."""
        return [d for (d,) in self.db.execute(
            "SELECT dep FROM deps WHERE task=? ORDER BY dep", (task,))]

    def started_any(self) -> bool:
        """Whether any task has ever been leased (the run has started)."""
        return self.db.execute(
            "SELECT 1 FROM tasks WHERE attempt > 0 LIMIT 1").fetchone() is not None

    def recent_ends(self, since: float) -> tuple[int, float | None, float | None]:
        """``(count, first ended_at, mean duration)`` of the tasks that succeeded or failed at
        or after ``since``."""
        n, first = self.db.execute(
            f"SELECT count(*), min(ended_at) FROM tasks WHERE state IN {_ENDED} AND ended_at >= ?",
            (since,),
        ).fetchone()
        # the mean over the latest of them only: a count and a min are read from the views'
        # index alone, a mean would read every row (0.26 s for a run that just ended 1M tasks)
        mean = self.recent_mean_duration(RECENT_MEAN_TASKS) if n else None
        return n, first, mean

    def mean_duration(self) -> float | None:
        """The mean duration of every task that succeeded or failed (None: none has)."""
        return self.db.execute(
            f"SELECT avg(ended_at - started_at) FROM tasks WHERE state IN {_ENDED}"
            " AND started_at IS NOT NULL").fetchone()[0]

    def running_since(self) -> list[float]:
        """When each running task started."""
        return [t0 for (t0,) in self.db.execute(
            f"SELECT started_at FROM tasks WHERE state={int(State.RUNNING)}"
            " AND started_at IS NOT NULL")]

    def last_failed(self, n: int) -> list[tuple[int, str | None, int | None, str | None, float]]:
        """``(id, key, exit_code, error, ended_at)`` of the ``n`` failed tasks that ended last."""
        return self.db.execute(
            f"SELECT id, key, exit_code, error, ended_at FROM tasks WHERE state={int(State.FAILED)}"
            " ORDER BY ended_at DESC LIMIT ?",
            (n,),
        ).fetchall()

    def last_notes(self, n: int) -> list[tuple[int, str]]:
        """``(id, note)`` of the ``n`` tasks with a note that ended last."""
        return self.db.execute(
            "SELECT id, note FROM tasks WHERE note IS NOT NULL ORDER BY ended_at DESC LIMIT ?",
            (n,),
        ).fetchall()

    def failed(self) -> Iterable[tuple[int, int | None, str | None]]:
        """``(id, exit_code, error)`` of every failed task, in id order, streamed."""
        yield from self.db.execute(
            f"SELECT id, exit_code, error FROM tasks WHERE state={int(State.FAILED)} ORDER BY id")

    # --- what the dashboard's /metrics asks (observe/metrics.py) ---------------------------------
    def duration_histogram(self, edges: Sequence[float]) -> tuple[list[int], int, float]:
        """``(cumulative counts per upper edge, count, sum)`` of the durations of every
        succeeded attempt (the current one in ``tasks`` and archived ones in ``attempts``):
        a Prometheus histogram with fixed ``edges``, in one pass over each table.

        Each duration gets its bucket from one ``CASE`` and the buckets are counted by
        ``GROUP BY``: on a 1,000,000-task catalog 0.4 s, where a ``sum(d <= edge)`` per edge
        took 0.8 s (22 comparisons a row)."""
        ok = int(Outcome.SUCCEEDED)
        case = ("CASE " + " ".join(f"WHEN d <= {float(e)!r} THEN {i}" for i, e in enumerate(edges))
                + f" ELSE {len(edges)} END") if edges else "0"
        per = [0] * (len(edges) + 1)
        total = 0.0
        for b, n, s in self.db.execute(
                f"SELECT {case} AS b, count(*), total(d) FROM ("
                f" SELECT ended_at - started_at AS d FROM tasks WHERE outcome = {ok}"
                "  AND started_at IS NOT NULL AND ended_at IS NOT NULL"
                f" UNION ALL SELECT ended_at - started_at FROM attempts WHERE outcome = {ok}"
                "  AND started_at IS NOT NULL AND ended_at IS NOT NULL) GROUP BY b"):
            per[b] += n
            total += s
        cum, run = [], 0
        for n in per[:-1]:
            run += n
            cum.append(run)
        return cum, run + per[-1], total

    # --- what the HTML report asks (observe/report.py) -------------------------------------------
    def attempt_span(self) -> tuple[float | None, float | None]:
        """``(first start, last end)`` over every attempt, archived or current (None: none)."""
        return self.db.execute(
            "SELECT min(s), max(e) FROM ("
            " SELECT min(started_at) AS s, max(ended_at) AS e FROM tasks"
            " UNION ALL SELECT min(started_at), max(ended_at) FROM attempts)").fetchone()

    def worker_busy(self, now: float) -> list[tuple[str | None, int, float, float | None, float | None]]:
        """``(worker, attempts, busy seconds, first start, last end)`` per worker, busiest
        first: every started attempt, archived or current; a running one counts up to ``now``."""
        running = int(State.RUNNING)
        return self.db.execute(
            "SELECT w, count(*), total(e - s), min(s), max(e) FROM ("
            " SELECT worker AS w, started_at AS s, ended_at AS e FROM attempts"
            "  WHERE started_at IS NOT NULL AND ended_at IS NOT NULL"
            " UNION ALL SELECT worker, started_at, coalesce(ended_at, ?) FROM tasks"
            f"  WHERE started_at IS NOT NULL AND (outcome IS NOT NULL OR state = {running}))"
            " GROUP BY w ORDER BY 3 DESC", (now,)).fetchall()

    def duration_quantiles(self, fractions: Sequence[float]) -> tuple[int, float | None, list[float]]:
        """``(count, mean, [quantile per fraction])`` of the durations of every succeeded
        attempt (current and archived); one sorted pass, the values are not kept."""
        ok = int(Outcome.SUCCEEDED)
        src = (f" FROM (SELECT ended_at - started_at AS d FROM tasks WHERE outcome = {ok}"
               "  AND started_at IS NOT NULL AND ended_at IS NOT NULL"
               f" UNION ALL SELECT ended_at - started_at FROM attempts WHERE outcome = {ok}"
               "  AND started_at IS NOT NULL AND ended_at IS NOT NULL)")
        n, mean = self.db.execute("SELECT count(*), avg(d)" + src).fetchone()
        if not n:
            return 0, None, []
        want = sorted({min(n - 1, max(0, int(f * n))) for f in fractions})
        at: dict[int, float] = {}
        cur = self.db.execute("SELECT d" + src + " ORDER BY d")
        i = 0
        for k in want:  # skip to each wanted rank without building a list
            while i < k:
                step = cur.fetchmany(min(65536, k - i))
                i += len(step)
            at[k] = cur.fetchone()[0]
            i += 1
        return n, mean, [at[min(n - 1, max(0, int(f * n)))] for f in fractions]

    # --- the shared read model (observe/snapshot.py: watch, dashboard, metrics, report) --------
    # Each is one pass over tasks at most (no readers' index: see schema.py): a view of a
    # 1,000,000-task run reads in about 0.1-0.3 s per query on 2 cores, cached by snapshot.py.
    def recent_mean_duration(self, n: int = 1000) -> float | None:
        """The mean duration of the ``n`` tasks that succeeded or failed last (None: none has)."""
        rows = [d for st in (State.SUCCEEDED, State.FAILED) for (d,) in self.db.execute(
            "SELECT ended_at - started_at FROM tasks WHERE state=? AND ended_at IS NOT NULL"
            " AND started_at IS NOT NULL ORDER BY ended_at DESC LIMIT ?", (int(st), n))]
        return sum(rows) / len(rows) if rows else None

    def running_rows(self, limit: int) -> list[tuple[int, str | None, str | None, str | None, float | None]]:
        """``(id, key, spec name, worker, started_at)`` of up to ``limit`` running tasks, the
        longest-running first."""
        return self.db.execute(
            "SELECT t.id, t.key, s.name, t.worker, t.started_at FROM tasks t"
            f" JOIN specs s ON s.id = t.spec WHERE t.state={int(State.RUNNING)}"
            " ORDER BY t.started_at LIMIT ?", (limit,)).fetchall()

    def running_by_worker(self) -> dict[str, int]:
        """Running tasks per worker."""
        return dict(self.db.execute(
            f"SELECT worker, count(*) FROM tasks WHERE state={int(State.RUNNING)}"
            " AND worker IS NOT NULL GROUP BY worker"))

    def worker_rows(self) -> list[tuple[str, str | None, int | None, float | None, float | None, int]]:
        """``(id, host, pid, started_at, heartbeat, gone)`` of every worker the catalog knows."""
        return self.db.execute(
            "SELECT id, host, pid, started_at, heartbeat, gone FROM workers ORDER BY started_at, id"
        ).fetchall()

    def ended_by_worker(self) -> dict[str, int]:
        """Attempts each worker ended (the tasks' current ones and the archived ones).

        A full scan of ``tasks``: callers cache it (observe/snapshot.py)."""
        out: dict[str, int] = {}
        for sql in ("SELECT worker, count(*) FROM tasks WHERE outcome IS NOT NULL"
                    " AND worker IS NOT NULL GROUP BY worker",
                    "SELECT worker, count(*) FROM attempts WHERE worker IS NOT NULL GROUP BY worker"):
            for w, n in self.db.execute(sql):
                out[w] = out.get(w, 0) + n
        return out

    def end_span(self) -> tuple[float | None, float | None]:
        """``(first, last)`` ``ended_at`` of the tasks that succeeded or failed."""
        lo, hi = self.db.execute(
            f"SELECT min(ended_at), max(ended_at) FROM tasks WHERE state IN {_ENDED}").fetchone()
        return lo, hi

    def has_views_index(self) -> bool:
        """Whether the views' index (:data:`~.schema.VIEWS_INDEX`) is there (an idle run)."""
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE type='index' AND name=?",
                               (VIEWS_INDEX,)).fetchone() is not None

    def ends_per_bucket(self, lo: float, width: float, buckets: int) -> list[int]:
        """Tasks that succeeded or failed in each of ``buckets`` even buckets of ``width``
        seconds from ``lo`` (the last one includes its upper edge)."""
        if self.has_views_index():  # two index range counts per bucket: ~60 ms on 1M tasks
            out = []
            for i in range(buckets):
                a, b = lo + i * width, lo + (i + 1) * width
                op = "<=" if i == buckets - 1 else "<"
                out.append(sum(self.db.execute(
                    f"SELECT count(*) FROM tasks WHERE state=? AND ended_at >= ? AND ended_at {op} ?",
                    (int(st), a, b)).fetchone()[0] for st in (State.SUCCEEDED, State.FAILED)))
            return out
        out = [0] * buckets  # one pass (a bucket count each would be a scan each)
        for b, n in self.db.execute(
                f"SELECT min(?, max(0, CAST((ended_at - ?) / ? AS INTEGER))), count(*) FROM tasks"
                f" WHERE state IN {_ENDED} AND ended_at IS NOT NULL GROUP BY 1",
                (buckets - 1, lo, width)):
            out[b] += n
        return out

    def succeeded_durations(self, sample: int) -> list[tuple[str, float]]:
        """``(spec name, duration)`` of the ``sample`` succeeded tasks that ended last (their
        current attempts), and of archived succeeded attempts among the last ``sample``."""
        rows = self.db.execute(
            "SELECT s.name, t.ended_at - t.started_at FROM (SELECT spec, started_at, ended_at"
            f" FROM tasks WHERE state={int(State.SUCCEEDED)} AND ended_at IS NOT NULL"
            " ORDER BY ended_at DESC LIMIT ?) t JOIN specs s ON s.id = t.spec"
            " WHERE t.started_at IS NOT NULL", (sample,)).fetchall()
        rows += self.db.execute(
            "SELECT s.name, a.ended_at - a.started_at FROM (SELECT task, started_at, ended_at"
            f" FROM attempts WHERE outcome={int(Outcome.SUCCEEDED)} ORDER BY rowid DESC LIMIT ?) a"
            " JOIN tasks t ON t.id = a.task JOIN specs s ON s.id = t.spec"
            " WHERE a.started_at IS NOT NULL AND a.ended_at IS NOT NULL", (sample,)).fetchall()
        return rows

    def latest_attempt_rows(self, since: float | None, limit: int
                            ) -> list[tuple[int, int, str | None, float | None, float | None, int | None, int]]:
        """``(task, attempt, worker, started_at, ended_at, outcome, state)`` of the attempts
        running now and of up to ``limit`` that ended last (at or after ``since``): current ones
        from ``tasks`` (outcome None while running), archived ones from ``attempts``."""
        lo = -1e300 if since is None else since
        rows = self.db.execute(
            "SELECT id, attempt, worker, started_at, ended_at, outcome, state FROM tasks"
            f" WHERE state IN {states.sql_list(states.ACTIVE)} ORDER BY started_at LIMIT ?",
            (limit,)).fetchall()
        for st in (int(State.SUCCEEDED), int(State.FAILED)):
            rows += self.db.execute(
                "SELECT id, attempt, worker, started_at, ended_at, outcome, state FROM tasks"
                " WHERE state=? AND ended_at >= ? ORDER BY ended_at DESC LIMIT ?",
                (st, lo, limit)).fetchall()
        rows += self.db.execute(
            "SELECT task, attempt, worker, started_at, ended_at, outcome, -1 FROM attempts"
            " WHERE rowid > (SELECT coalesce(max(rowid), 0) FROM attempts) - ?"
            " AND ended_at >= ?", (limit, lo)).fetchall()
        return rows

    def cached_count(self) -> int:
        """Tasks whose result came from the result cache (a partial index: no scan)."""
        return self.db.execute(
            f"SELECT count(*) FROM tasks WHERE outcome = {int(Outcome.CACHED)}").fetchone()[0]

    def outcome_counts(self) -> dict[int, int]:
        """Attempts by outcome value: the tasks' current attempts and the archived ones."""
        out = {int(o): 0 for o in Outcome}
        cached = self.cached_count()
        out[int(Outcome.CACHED)] += cached
        out[int(Outcome.SUCCEEDED)] += self.db.execute(
            f"SELECT count(*) FROM tasks WHERE state={int(State.SUCCEEDED)}").fetchone()[0] - cached
        others = states.sql_list(set(State) - {State.SUCCEEDED, State.READY, State.BLOCKED})
        for sql in (f"SELECT outcome, count(*) FROM tasks WHERE state IN {others}"
                    " AND outcome IS NOT NULL GROUP BY outcome",
                    # ready and blocked tasks hold an outcome only while a retry waits
                    f"SELECT outcome, count(*) FROM tasks WHERE state IN {states.sql_list({State.READY, State.BLOCKED})}"
                    " AND outcome IS NOT NULL GROUP BY outcome",
                    "SELECT outcome, count(*) FROM attempts GROUP BY outcome"):
            for o, n in self.db.execute(sql):
                out[o] = out.get(o, 0) + n
        return out

    def failed_latest(self, n: int) -> list[tuple[int, int | None, str | None]]:
        """``(id, exit_code, error)`` of the ``n`` failed tasks that ended last, in id order
        (an index range however many tasks failed)."""
        rows = self.db.execute(
            f"SELECT id, exit_code, error FROM tasks WHERE state={int(State.FAILED)}"
            " ORDER BY ended_at DESC LIMIT ?", (n,)).fetchall()
        rows.sort()
        return rows

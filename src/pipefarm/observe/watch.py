"""``pipefarm watch``: a run's live view, in a terminal or a notebook.

This module holds what does not need textual: the text it shows (:func:`bar`,
:func:`summary_lines`, :func:`last_lines`) and :class:`RunWatch`, what ``Run.watch()``
returns (``.snapshot()``, ``.overview()``, an HTML table in a notebook, ``.run()`` for the
terminal app). The terminal app itself is :mod:`.watch_tui`, imported only when it starts.
Every number comes from :mod:`.snapshot`, the read model the dashboard shares.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from ..states import State
from . import snapshot as snap

#: how often the terminal view reads the run (a snapshot of a 1,000,000-task run takes ~80 ms)
DEFAULT_INTERVAL_S = 1.0
#: lines of a task's output the log view shows
LOG_LINES = 200

#: the states in the order the views list them (the run's life from left to right)
ORDER = (State.SUCCEEDED, State.FAILED, State.RUNNING, State.CLAIMED, State.READY,
         State.BLOCKED, State.SKIPPED, State.CANCELLED)


def fmt_s(seconds: float | None) -> str:
    """``-``, ``12.3s``, ``4m05s``, ``2h03m`` or ``3d04h``: short enough for 80 columns."""
    if seconds is None:
        return "-"
    s = max(0.0, float(seconds))
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def bar(ov: snap.Overview, width: int = 40) -> str:
    """A progress bar of the ended tasks: ``█`` succeeded, ``▓`` other ends, ``░`` left."""
    total = max(ov.total, 1)
    ok = ov.counts.get("succeeded", 0)
    bad = ov.done - ok
    n_ok = round(width * ok / total)
    n_bad = min(width - n_ok, round(width * bad / total))
    if bad and not n_bad:
        n_bad, n_ok = 1, min(n_ok, width - 1)  # a failure shows, however few
    return "█" * n_ok + "▓" * n_bad + "░" * (width - n_ok - n_bad)


def summary_lines(ov: snap.Overview) -> list[str]:
    """The head of the view: the run and where it stands, then the counts by state."""
    pct = 100.0 * ov.done / ov.total if ov.total else 100.0
    left = ov.total - ov.done
    if ov.live:
        where = f"live  {ov.throughput_per_s:,.2f} tasks/s  eta {fmt_s(ov.eta_s)}"
    elif left:
        where = f"not running: {left:,} left (pipefarm run {ov.run})"
    else:
        where = "finished"
    counts = "  ".join(f"{s.label} {ov.counts.get(s.label, 0):,}" for s in ORDER
                       if ov.counts.get(s.label, 0) or s in (State.SUCCEEDED, State.FAILED))
    return [f"{ov.run}  {where}", f"{ov.done:,}/{ov.total:,} done ({pct:.1f}%)  {counts}"]


def last_lines(data: bytes, n: int = LOG_LINES) -> str:
    """The last ``n`` lines of some output, decoded leniently."""
    lines = data.decode("utf-8", "replace").splitlines()
    return "\n".join(lines[-n:])


def task_log(run_dir: str | os.PathLike[str], task: int, n: int = LOG_LINES) -> str:
    """The last ``n`` lines of the latest attempt's stdout and stderr of ``task`` (what
    ``pipefarm logs`` shows; a running task's so far, as ``logs --follow`` reads them), or why
    they cannot be read."""
    import warnings

    from ..execute.output import OutputUnavailable
    from ..run import Run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reading output unpickles nothing
        run = Run.open(run_dir, readonly=True)
    try:
        rows = run.tasks(ids=[task])
        if not rows:
            return f"no task {task}"
        row = rows[0]
        parts = []
        for stream in ("stdout", "stderr"):
            try:
                if row.state in ("claimed", "running"):
                    data = _so_far(run, task, stream, (row.state, row.worker, row.attempts))
                else:
                    data = run.output(task, None, stream)
                text = last_lines(data, n)
            except (OutputUnavailable, KeyError) as exc:
                text = f"(cannot be read: {exc})"
            parts.append(f"--- {stream} ---\n{text or '(empty)'}")
        if row.error:
            parts.append(f"--- error ---\n{last_lines(row.error.encode(), 20)}")
        return "\n".join(parts)
    finally:
        run.close()


class _Once(Exception):
    """Ends :func:`~pipefarm.execute.output.follow_output` after its first read."""


def _so_far(run: Any, task: int, stream: str, now: tuple[str, str | None, int]) -> bytes:
    """What a running attempt has printed so far: one pass of ``logs --follow``'s reader (it
    alone knows where a live attempt's output lies), stopped before it polls again."""
    from ..execute.output import follow_output

    out: list[bytes] = []
    polls = iter([now])

    def poll() -> tuple[str, str | None, int]:
        try:
            return next(polls)
        except StopIteration:
            raise _Once from None

    try:
        follow_output(run.path, task, stream, poll, lambda a: run.store.output_ref(task, a),
                      out.append, sleep=lambda s: None)
    except _Once:
        pass
    return b"".join(out)


def render_text(run_dir: str | os.PathLike[str], width: int = 80) -> str:
    """The view as plain text, once (``pipefarm watch --once``, or stdout not a terminal)."""
    data = snap.snapshot(run_dir)
    ov = snap.Overview(**data["overview"])
    out = [*summary_lines(ov), bar(ov, width - 2)]
    if data["running"]:
        out.append(f"running ({ov.counts.get('running', 0):,}):")
        out += [f"  {r['id']:>8}  {r['label'][:30]:<30}  {(r['worker'] or '-')[:22]:<22}"
                f"  {fmt_s(r['elapsed_s'])}" for r in data["running"][:10]]
    if data["workers"]:
        out.append("workers:")
        out += [f"  {w['id'][:22]:<22}  {(w['host'] or '-')[:14]:<14}  done {w['done']:>8,}"
                f"  running {w['running']:>3}  hb {fmt_s(w['heartbeat_age_s']):>6}  {w['state']}"
                for w in data["workers"][:10]]
    if data["failures"]:
        out.append("failure groups:")
        out += [f"  {g['count']:>8,}  {g['signature'][:width - 14]}" for g in data["failures"]]
    return "\n".join(out)


class RunWatch:
    """A run's live view for scripts and notebooks (``Run.watch()``).

    ``.overview()`` and ``.snapshot()`` read the run now; in a notebook the object shows as a
    table of counts with a bar; ``.run()`` starts the terminal view (``pipefarm watch``).
    """

    def __init__(self, run_dir: str | os.PathLike[str], interval: float = DEFAULT_INTERVAL_S) -> None:
        self.path = Path(run_dir)
        self.interval = interval

    def overview(self) -> snap.Overview:
        """Counts by state, rate and ETA, now."""
        return snap.overview(self.path)

    def snapshot(self) -> dict[str, Any]:
        """The live payload (overview, running tasks, workers, failure groups), JSON-ready."""
        return snap.snapshot(self.path)

    def run(self, interval: float | None = None) -> None:
        """Start the terminal view; returns when it is quit (``q``)."""
        from .watch_tui import WatchApp

        WatchApp(self.path, interval or self.interval).run()

    def __repr__(self) -> str:
        return f"RunWatch({str(self.path)!r})"

    def _repr_html_(self) -> str:
        ov = self.overview()
        total = max(ov.total, 1)
        cells = "".join(
            f"<tr><td>{s.label}</td><td style='text-align:right'>{ov.counts.get(s.label, 0):,}</td>"
            f"<td><div style='background:{_COLOURS[s]};height:0.8em;"
            f"width:{200 * ov.counts.get(s.label, 0) / total:.1f}px'></div></td></tr>"
            for s in ORDER)
        head = html.escape(summary_lines(ov)[0])
        return (f"<div><b>{head}</b><table>{cells}"
                f"<tr><td><b>total</b></td><td style='text-align:right'><b>{ov.total:,}</b></td>"
                f"<td>{ov.done:,} done</td></tr></table></div>")


_COLOURS = {State.SUCCEEDED: "#2ca02c", State.FAILED: "#d62728", State.RUNNING: "#1f77b4",
            State.CLAIMED: "#17becf", State.READY: "#bbbbbb", State.BLOCKED: "#888888",
            State.SKIPPED: "#ff7f0e", State.CANCELLED: "#9467bd"}

"""One self-contained HTML file about a run (``pipefarm report``): the thing to attach to a
ticket.

Summary, throughput over time, durations, worker utilisation, the latest attempts as a Gantt
chart per worker, and failure groups with an example's stderr. Charts are inline SVG
(:mod:`.svg`), CSS is inline, and a Content-Security-Policy forbids every fetch: the file
names no URL and opens offline. Every value from the run (keys, errors, output, worker names)
is HTML-escaped. Its size is bounded whatever the run's size: everything is aggregated, and
the lists (attempts drawn, workers, failure groups, task ids, stderr lines) have caps.

The numbers come from the shared read model (:mod:`.snapshot`) and a few report queries of
:class:`~pipefarm.store.sqlite.query.CatalogQuery`; a shared-filesystem run is folded first.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Iterable
from html import escape
from pathlib import Path
from typing import Any

from .. import states
from ..states import Outcome, State
from ..store.sqlite.query import CatalogQuery
from . import svg
from .show import signal_name

#: attempts drawn in the task stream: the latest ones. 5,000 bars are ~0.6 MB of SVG and draw
#: in well under a second in Chromium; the caption says how many of all attempts are shown
STREAM_BARS = 5000
#: worker lanes in the task stream and bars in the utilisation chart (the busiest first):
#: a 1,000-node array still gives a readable page
MAX_WORKERS = 100
#: failure groups shown, and task ids listed per group
FAILURE_GROUPS = 20
TASK_IDS_PER_GROUP = 50
#: lines and bytes of an example's stderr (and error text) shown
STDERR_LINES = 25
STDERR_BYTES = 8192
#: functions/commands given a duration histogram of their own (the most frequent ones)
DURATION_NAMES = 12
#: ... and rows in the table of durations by name
DURATION_ROWS = 200
#: columns of the throughput timeline
THROUGHPUT_BUCKETS = 60

#: colours by state and by attempt outcome (colour-blind friendly: Tableau 10)
STATE_COLORS = {
    "blocked": "#bab0ac", "ready": "#9ecae9", "claimed": "#76b7b2", "running": "#4c78a8",
    "succeeded": "#59a14f", "failed": "#e15759", "skipped": "#edc948", "cancelled": "#b07aa1",
}
OUTCOME_COLORS = {
    "succeeded": "#59a14f", "failed": "#e15759", "timed_out": "#f28e2b", "lost": "#b07aa1",
    "released": "#bab0ac", "stale": "#9c755f", "running": "#4c78a8",
}

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:960px;
color:#222;padding:0 12px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:32px;border-bottom:1px solid #ddd;
padding-bottom:4px}h3{font-size:14px;margin:18px 0 6px}
.sub{color:#666;font-size:13px}table{border-collapse:collapse;font-size:13px;margin:6px 0}
td,th{padding:3px 10px 3px 0;text-align:left;vertical-align:top}th{color:#555;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
pre{background:#f6f6f6;padding:8px;font-size:12px;overflow-x:auto;white-space:pre-wrap;
word-break:break-all;max-height:420px}
.note{color:#666;font-size:12px}.bad{color:#c0392b}.ok{color:#2e7d32}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:0 32px}
.fg{border-left:3px solid #e15759;padding-left:10px;margin:14px 0}
code{font-size:12px}svg{display:block;max-width:100%;height:auto}
"""


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def _utc(t: float | None) -> str:
    if t is None:
        return "-"
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _tail(text: str, lines: int = STDERR_LINES, nbytes: int = STDERR_BYTES) -> tuple[str, bool]:
    """The last ``lines`` lines (at most ``nbytes`` characters) of ``text``; whether cut."""
    cut = False
    if len(text) > nbytes:
        text, cut = text[-nbytes:], True
    parts = text.rstrip("\n").splitlines()
    if len(parts) > lines:
        parts, cut = parts[-lines:], True
    return "\n".join(parts), cut


def _table(rows: Iterable[tuple[object, ...]], head: tuple[str, ...] | None = None,
           numeric: Iterable[int] = ()) -> str:
    num = set(numeric)
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(
            f'<td class="n">{_e(v)}</td>' if i in num else f"<td>{_e(v)}</td>"
            for i, v in enumerate(r)) + "</tr>")
    out.append("</table>")
    return "".join(out)


class _Data:
    """Everything the report shows, read once (one fold, then the read model and queries)."""

    def __init__(self, run: Any) -> None:
        from . import snapshot as S

        run_dir = Path(run.path)
        self.run = run
        self.ov = S.overview(run_dir)  # folds a shared-filesystem run first
        self.now = self.ov.now
        self.attempts = S.attempt_totals(run_dir)
        self.durations = S.durations(run_dir)
        self.throughput = S.throughput(run_dir, THROUGHPUT_BUCKETS)
        self.bars = S.task_stream(run_dir, None, STREAM_BARS)
        self.workers = {w.id: w for w in S.workers(run_dir)}
        self.groups = S.failure_groups(run_dir, FAILURE_GROUPS)
        with CatalogQuery.open(run_dir) as q:
            self.first, self.last = q.attempt_span()
            self.busy = q.worker_busy(self.now)
            self.n_ok, self.mean, qs = q.duration_quantiles((0.5, 0.95, 1.0))
            self.p50, self.p95, self.max = qs if qs else (None, None, None)
            self.examples = {t.id: t for t in q.tasks(ids=[g.example_task for g in self.groups])}
        self.running_attempts = self.ov.counts.get(State.RUNNING.label, 0)

    @property
    def end(self) -> float | None:
        """The end of the run's span: now while tasks run, else the last attempt's end."""
        if self.first is None:
            return None
        if self.running_attempts:
            return self.now
        return self.last if self.last is not None else self.now

    @property
    def wall(self) -> float | None:
        end = self.end
        return None if end is None or self.first is None else max(0.0, end - self.first)

    def worker_name(self, wid: str | None) -> str:
        if wid is None:
            return "(no worker)"
        w = self.workers.get(wid)
        if w is not None and w.host:
            return f"{w.host}:{w.pid}" if w.pid is not None else str(w.host)
        return str(wid)


def _condition(d: _Data) -> tuple[str, str]:
    """How the run stands, in words, and a CSS class."""
    ov = d.ov
    left = ov.total - ov.done
    if ov.total == 0:
        return "empty: no tasks", ""
    if left == 0:
        bad = sum(ov.counts.get(s.label, 0) for s in states.UNSUCCESSFUL_END)
        return (f"finished, {bad:,} task(s) did not succeed", "bad") if bad else ("finished, all succeeded", "ok")
    if ov.live:
        eta = f", about {svg.fmt_seconds(ov.eta_s)} left" if ov.eta_s is not None else ""
        return f"running: {left:,} task(s) left{eta}", ""
    return (f"not running: {left:,} task(s) left (stopped, crashed or not started; resume with "
            f"pipefarm run {ov.run})", "bad")


def _summary(d: _Data) -> str:
    ov = d.ov
    cond, cls = _condition(d)
    wall = d.wall
    n_done_attempts = sum(v for k, v in d.attempts.items())
    busy_total = sum(b[2] for b in d.busy)
    n_workers = len({b[0] for b in d.busy} | set(d.workers))
    alive = sum(1 for w in d.workers.values() if w.state == "alive")
    rows: list[tuple[object, ...]] = [
        ("state", cond),
        ("tasks", f"{ov.total:,} ({ov.done:,} ended)"),
        ("first start", _utc(d.first)),
        ("last end" if not d.running_attempts else "now", _utc(d.end)),
        ("wall time", svg.fmt_seconds(wall) if wall is not None else "-"),
        ("busy time (all attempts)", svg.fmt_seconds(busy_total)),
        ("throughput (mean over wall time)",
         f"{ov.done / wall:,.3g} tasks/s" if wall and ov.done else "-"),
    ]
    if ov.live:
        rows.append(("throughput (last minute)", f"{ov.throughput_per_s:,.3g} tasks/s"))
    rows += [
        ("succeeded attempts' duration",
         f"mean {svg.fmt_seconds(d.mean)}, p50 {svg.fmt_seconds(d.p50)}, p95 {svg.fmt_seconds(d.p95)},"
         f" max {svg.fmt_seconds(d.max)} ({d.n_ok:,} attempts)" if d.n_ok else "- (none succeeded)"),
        # a finished run's workers may not have been marked gone yet: "alive" only while live
        ("workers", f"{n_workers:,} seen" + (f", {alive:,} alive now" if alive and ov.live else "")),
        ("attempts", f"{n_done_attempts:,} ended" + (f", {d.running_attempts:,} running" if d.running_attempts else "")),
    ]
    state_rows = [(s.label, ov.counts.get(s.label, 0)) for s in State]
    out_rows = [(o.label, d.attempts.get(o.label, 0)) for o in Outcome]
    return (
        "<h2>Summary</h2>" + _table(rows)
        + '<div class="grid"><div><h3>Tasks by state</h3>'
        + _table(((k, f"{v:,}") for k, v in state_rows), ("state", "tasks"), numeric=[1])
        + svg.bars([(k, v) for k, v in state_rows if v], label="tasks by state", width=440,
                   colors=[STATE_COLORS.get(k, svg.DEFAULT_COLOR) for k, v in state_rows if v])
        + "</div><div><h3>Attempts by outcome</h3>"
        + _table(((k, f"{v:,}") for k, v in out_rows), ("outcome", "attempts"), numeric=[1])
        + svg.bars([(k, v) for k, v in out_rows if v], label="attempts by outcome", width=440,
                   colors=[OUTCOME_COLORS.get(k, svg.DEFAULT_COLOR) for k, v in out_rows if v])
        + "</div></div>"
    )


def _throughput(d: _Data) -> str:
    pts = [(float(t), float(n)) for t, n in d.throughput]
    step = (pts[1][0] - pts[0][0]) if len(pts) > 1 else None
    cap = f" (tasks ended per {svg.fmt_seconds(step)})" if step else ""
    return ("<h2>Throughput</h2>"
            + f'<p class="note">Tasks that ended in each interval of the run{_e(cap)}.</p>'
            + svg.timeline(pts, label="tasks ended", step=step, width=900))


def _durations(d: _Data) -> str:
    from .snapshot import DURATION_SAMPLE

    stats = sorted(d.durations, key=lambda s: -s.count)
    sample = (f" (the percentiles and histograms from the latest {DURATION_SAMPLE:,} of {d.n_ok:,};"
              " the summary's are over all)") if d.n_ok > DURATION_SAMPLE else ""
    out = ["<h2>Durations</h2>",
           f'<p class="note">Succeeded attempts, by function or command name{_e(sample)}.</p>']
    if not stats:
        return "".join(out) + "<p>No attempt succeeded yet.</p>"
    out.append(_table(((s.name, f"{s.count:,}", svg.fmt_seconds(s.p50), svg.fmt_seconds(s.p95),
                        svg.fmt_seconds(s.max)) for s in stats[:DURATION_ROWS]),
                      ("name", "attempts", "p50", "p95", "max"), numeric=[1, 2, 3, 4]))
    for s in stats[:DURATION_NAMES]:
        out.append(f"<h3>{_e(s.name)}</h3>")
        out.append(svg.histogram(list(s.edges), list(s.counts), label=f"{s.name}: duration", width=900))
    if len(stats) > DURATION_ROWS:
        out.append(f'<p class="note">The table lists the {DURATION_ROWS} most frequent names of'
                   f" {len(stats):,}.</p>")
    if len(stats) > DURATION_NAMES:
        out.append(f'<p class="note">Histograms of the {DURATION_NAMES} most frequent names of'
                   f" {len(stats):,}.</p>")
    return "".join(out)


def _utilisation(d: _Data) -> str:
    out = ["<h2>Worker utilisation</h2>"]
    wall = d.wall
    if not d.busy or not wall:
        return out[0] + "<p>No attempt has started yet.</p>"
    total = sum(b[2] for b in d.busy)
    out.append(f'<p class="note">Busy fraction of each worker over the run\'s span'
               f" ({_e(svg.fmt_seconds(wall))}): the time its attempts ran, divided by the span."
               f" Mean over {len(d.busy):,} worker(s): {total / (len(d.busy) * wall):.0%}.</p>")
    shown = d.busy[:MAX_WORKERS]
    out.append(svg.bars([(d.worker_name(w), min(1.0, b / wall)) for w, _, b, _, _ in shown],
                        label="busy fraction per worker", width=900, max_value=1.0,
                        fmt=lambda v: f"{v:.0%}",
                        notes=[f"({n:,} attempts)" for _, n, _, _, _ in shown]))
    if len(d.busy) > MAX_WORKERS:
        out.append(f'<p class="note">The {MAX_WORKERS} busiest of {len(d.busy):,} workers.</p>')
    return "".join(out)


def _stream(d: _Data) -> str:
    out = ["<h2>Task stream</h2>"]
    bars = d.bars
    if not bars:
        return out[0] + "<p>No attempt has started yet.</p>"
    lanes: dict[str | None, list[tuple[float, float, str, str]]] = {}
    t0 = min(b.start for b in bars)
    t1 = max((b.end if b.end is not None else d.now) for b in bars)
    for b in bars:
        end = b.end if b.end is not None else d.now
        tip = f"task {b.task} attempt {b.attempt}: {b.outcome}, {svg.fmt_seconds(end - b.start)}"
        lanes.setdefault(b.worker, []).append((b.start, end, b.outcome, tip))
    order = sorted(lanes, key=lambda w: -len(lanes[w]))[:MAX_WORKERS]
    order.sort(key=lambda w: d.worker_name(w))
    total = sum(d.attempts.values()) + d.running_attempts
    shown = sum(len(lanes[w]) for w in order)
    cap = (f"The latest {len(bars):,} of {total:,} attempts" if len(bars) < total
           else f"All {len(bars):,} attempts")
    if len(order) < len(lanes):
        cap += f"; {len(order)} of {len(lanes):,} workers ({shown:,} bars)"
    out.append(f'<p class="note">{_e(cap)}, one lane per worker, coloured by outcome'
               f" (at most {STREAM_BARS:,} attempts are drawn).</p>")
    out.append(svg.gantt([(d.worker_name(w), lanes[w]) for w in order], label="attempts per worker",
                         t0=t0, t1=t1, colors=OUTCOME_COLORS, width=900))
    return "".join(out)


def _stderr_of(run: Any, task: int) -> str:
    from ..execute.output import OutputUnavailable

    try:
        return run.output(task, None, "stderr").decode("utf-8", "replace")
    except (OutputUnavailable, OSError, KeyError):
        return ""


def _failures(d: _Data) -> str:
    out = ["<h2>Failures</h2>"]
    if not d.groups:
        return out[0] + "<p>No failed tasks.</p>"
    n_failed = d.ov.counts.get(State.FAILED.label, 0)
    out.append(f'<p class="note">{n_failed:,} failed task(s) grouped by error signature (exit code'
               " and last stderr line, or exception, with numbers, paths and quoted values blanked);"
               f" the {FAILURE_GROUPS} biggest groups. Full output: pipefarm logs RUN ID --stderr.</p>")
    for g in d.groups:
        t = d.examples.get(g.example_task)
        ids = ", ".join(str(i) for i in g.task_ids[:TASK_IDS_PER_GROUP])
        more = f" … ({g.count:,} in all)" if g.count > min(len(g.task_ids), TASK_IDS_PER_GROUP) else ""
        rows: list[tuple[object, ...]] = [("tasks", f"{g.count:,}: {ids}{more}"),
                                          ("example task", g.example_task)]
        if t is not None:
            if t.key is not None:
                rows.append(("key", t.key))
            sig = signal_name(t.exit_code)
            rows.append(("exit code", "-" if t.exit_code is None else
                         f"{t.exit_code} ({sig})" if sig else t.exit_code))
            rows.append(("attempts", t.attempts))
        out.append(f'<div class="fg"><h3>{_e(g.signature)}</h3>' + _table(rows))
        err, cut = _tail(g.example_error or "")
        if err:
            out.append(f"<div class=\"note\">error{' (last lines)' if cut else ''}</div><pre>{_e(err)}</pre>")
        stderr, cut = _tail(_stderr_of(d.run, g.example_task))
        if stderr and stderr.strip() not in err:
            out.append(f"<div class=\"note\">stderr{' (last lines)' if cut else ''}</div><pre>{_e(stderr)}</pre>")
        out.append("</div>")
    return "".join(out)


def render(run: Any) -> str:
    """The report of ``run`` as one HTML document (text)."""
    t_start = time.perf_counter()
    d = _Data(run)
    body = "".join((_summary(d), _throughput(d), _durations(d), _utilisation(d), _stream(d),
                    _failures(d)))
    took = time.perf_counter() - t_start
    from .. import __version__ as version  # noqa: PLC0415 - read once, when rendering

    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        # nothing may be fetched: the file must read the same offline and in a ticket system
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none';"
        " style-src 'unsafe-inline'\">"
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
        f"<title>pipefarm report: {_e(os.path.basename(str(run.path).rstrip('/')))}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>pipefarm report</h1><div class=\"sub\"><code>{_e(run.path)}</code> · generated"
        f" {_e(_utc(d.now))} by pipefarm {_e(version)} in {took:.2f} s</div>"
        f"{body}</body></html>\n"
    )


def write_report(run: Any, path: str | os.PathLike[str]) -> int:
    """Write the report of ``run`` to ``path`` atomically (whole or not at all); its size in
    bytes."""
    from .export import replace_file

    data = render(run).encode("utf-8")
    replace_file(path, lambda f: f.write(data))
    return len(data)

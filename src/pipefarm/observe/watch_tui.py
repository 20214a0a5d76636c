"""The terminal app of ``pipefarm watch`` (textual): imported only when the view starts.

The run is read in a worker thread (one :func:`~.snapshot.snapshot` per refresh: one fold,
one read-only query connection), so the screen never waits on the catalog; what was read is
drawn on the app's own thread. It fits 80x24 (over ssh) and works on live, finished and
crashed runs alike: it only reads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Log, Static

from . import snapshot as snap
from .watch import DEFAULT_INTERVAL_S, bar, fmt_s, summary_lines, task_log

#: failure groups the failures screen lists
FAILURE_GROUPS = 100


def _cut(text: str | None, n: int) -> str:
    """One line of at most ``n`` characters."""
    line = " ".join((text or "").split())
    return line if len(line) <= n else line[: n - 1] + "…"


def _fill(table: DataTable, rows: list[tuple[str, tuple[Any, ...]]]) -> None:
    """Replace a table's rows, keeping the cursor on the same row key where it still is."""
    keep = None
    if table.row_count and 0 <= table.cursor_row < table.row_count:
        keep = table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value
    table.clear()
    at = 0
    for i, (key, cells) in enumerate(rows):
        table.add_row(*cells, key=key)
        if key == keep:
            at = i
    if rows:
        table.move_cursor(row=at, animate=False)


def _selected(table: DataTable) -> str | None:
    if not table.row_count or not 0 <= table.cursor_row < table.row_count:
        return None
    return table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value


class LogScreen(Screen[None]):
    """The last lines of one task's output (``l`` or Enter on a task; ``escape`` goes back)."""

    BINDINGS = [Binding("escape,l,q", "app.pop_screen", "back")]

    def __init__(self, run_dir: Path, task: int) -> None:
        super().__init__()
        self.run_dir, self.task_id = run_dir, task

    def compose(self) -> ComposeResult:
        yield Static(f"task {self.task_id}: the last lines of its latest attempt", id="log-title")
        yield Log(id="log", highlight=False)
        yield Footer()

    def on_mount(self) -> None:
        self.load()

    @work(thread=True)
    def load(self) -> None:
        text = task_log(self.run_dir, self.task_id)
        self.app.call_from_thread(self.query_one(Log).write_lines, text.splitlines())


class FailuresScreen(Screen[None]):
    """Every failure group, biggest first (``f``; ``l``/Enter: an example's output)."""

    BINDINGS = [Binding("escape,f,q", "app.pop_screen", "back"),
                Binding("l", "log", "log of the example")]

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.run_dir = run_dir

    def compose(self) -> ComposeResult:
        yield Static("failure groups (reading...)", id="groups-title")
        yield DataTable(id="groups", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns("tasks", "signature", "e.g. task")
        self.load()

    @work(thread=True)
    def load(self) -> None:
        groups = snap.failure_groups(self.run_dir, limit=FAILURE_GROUPS)
        self.app.call_from_thread(self.show, groups)

    def show(self, groups: list[Any]) -> None:
        n = sum(g.count for g in groups)
        self.query_one("#groups-title", Static).update(
            f"{n:,} failed task(s) in {len(groups)} group(s)" if groups else "no failed tasks")
        _fill(self.query_one(DataTable), [
            (str(g.example_task), (f"{g.count:,}", _cut(g.signature, 60), str(g.example_task)))
            for g in groups])
        self.query_one(DataTable).focus()

    def action_log(self) -> None:
        key = _selected(self.query_one(DataTable))
        if key is not None:
            self.app.push_screen(LogScreen(self.run_dir, int(key)))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_log()


class WatchApp(App[None]):
    """The live view of one run."""

    TITLE = "pipefarm watch"
    CSS = """
    #head { height: 2; }
    #bar { height: 1; }
    .label { height: 1; text-style: bold; }
    #running { height: 1fr; min-height: 3; }
    #workers { height: 5; }
    #failures { height: 4; }
    #log-title, #groups-title { height: 1; text-style: bold; }
    """
    BINDINGS = [Binding("q", "quit", "quit"), Binding("f", "failures", "failures"),
                Binding("l", "log", "log"), Binding("tab", "focus_next", "next table", show=False)]

    def __init__(self, run_dir: str | os.PathLike[str], interval: float = DEFAULT_INTERVAL_S) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.interval = max(0.05, float(interval))
        #: the last snapshot drawn (None before the first), and the last read's error
        self.last: dict[str, Any] | None = None
        self.error: str | None = None
        self.refreshes = 0

    def compose(self) -> ComposeResult:
        yield Static(f"{self.run_dir}  reading...", id="head")
        yield Static("", id="bar")
        yield Static("running", id="running-label", classes="label")
        yield DataTable(id="running", cursor_type="row", zebra_stripes=True)
        yield Static("workers", id="workers-label", classes="label")
        yield DataTable(id="workers", cursor_type="row", zebra_stripes=True)
        yield Static("failures", id="failures-label", classes="label")
        yield DataTable(id="failures", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#running", DataTable).add_columns("task", "name or key", "worker", "elapsed")
        self.query_one("#workers", DataTable).add_columns(
            "worker", "host", "pid", "done", "running", "heartbeat", "state")
        self.query_one("#failures", DataTable).add_columns("tasks", "signature")
        self.reload()
        self.set_interval(self.interval, self.reload)

    @work(thread=True, exclusive=True, group="read")
    def reload(self) -> None:
        """Read the run off the app's thread; draw it on the app's thread."""
        try:
            data = snap.snapshot(self.run_dir, running_limit=50, failure_limit=10)
        except Exception as exc:  # a damaged or vanished run: say so, keep trying
            self.call_from_thread(self.show_error, f"{type(exc).__name__}: {exc}")
            return
        self.call_from_thread(self.show, data)

    def show_error(self, message: str) -> None:
        self.error = message
        self.query_one("#head", Static).update(f"{self.run_dir}\ncannot read the run: {_cut(message, 70)}")

    def show(self, data: dict[str, Any]) -> None:
        self.last, self.error = data, None
        self.refreshes += 1
        ov = snap.Overview(**data["overview"])
        self.query_one("#head", Static).update("\n".join(summary_lines(ov)))
        width = max(10, self.size.width - 2)
        self.query_one("#bar", Static).update(bar(ov, width))
        running, workers, groups = data["running"], data["workers"], data["failures"]
        n_run = ov.counts.get("running", 0)
        self.query_one("#running-label", Static).update(
            f"running: {n_run:,}" + (f" (the {len(running)} longest shown)" if n_run > len(running) else ""))
        _fill(self.query_one("#running", DataTable), [
            (str(r["id"]), (str(r["id"]), _cut(r["label"], 30), _cut(r["worker"], 22), fmt_s(r["elapsed_s"])))
            for r in running])
        alive = sum(w["state"] == "alive" for w in workers)
        self.query_one("#workers-label", Static).update(f"workers: {alive} alive of {len(workers)}")
        _fill(self.query_one("#workers", DataTable), [
            (w["id"], (_cut(w["id"], 22), _cut(w["host"], 14), str(w["pid"] or "-"), f"{w['done']:,}",
                       str(w["running"]), fmt_s(w["heartbeat_age_s"]), w["state"]))
            for w in workers])
        failed = ov.counts.get("failed", 0)
        self.query_one("#failures-label", Static).update(
            f"failures: {failed:,} task(s), {len(groups)} group(s) shown (f: all)" if groups
            else "failures: none")
        _fill(self.query_one("#failures", DataTable), [
            (str(g["example_task"]), (f"{g['count']:,}", _cut(g["signature"], 68))) for g in groups])

    def action_failures(self) -> None:
        self.push_screen(FailuresScreen(self.run_dir))

    def action_log(self) -> None:
        """The output of the selected running task, or of the selected failure's example."""
        focused = self.focused
        tables = [self.query_one("#running", DataTable), self.query_one("#failures", DataTable)]
        if isinstance(focused, DataTable) and focused in tables:
            tables = [focused]
        for table in tables:
            key = _selected(table)
            if key is not None:
                self.push_screen(LogScreen(self.run_dir, int(key)))
                return
        self.notify("no task selected: pick one in the running or failures table", timeout=3)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id in ("running", "failures"):
            self.push_screen(LogScreen(self.run_dir, int(event.row_key.value or 0)))

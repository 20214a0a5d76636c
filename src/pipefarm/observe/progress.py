"""Progress display: a bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import IO, Any


def _done(c: dict[str, int]) -> int:
    return sum(c.get(k, 0) for k in ("succeeded", "failed", "skipped", "cancelled"))


class ProgressDisplay:
    """Call it with the counts by state; close it at the end.

    Renders only when called (no thread), at most ``fps`` times a second.
    """

    def __init__(self, total: int | None = None, *, stream: IO[str] | None = None,
                 interval_s: float = 10.0, fps: float = 8.0, label: str = "tasks") -> None:
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval_s = interval_s
        self.min_gap = 1.0 / fps
        self.label = label
        self.t0 = time.monotonic()
        self.last = 0.0
        self.start_done: int | None = None
        self._bar: Any = None
        self._task: Any = None

    def _line(self, c: dict[str, int]) -> str:
        total = sum(v for k, v in c.items() if k != "running") or 0
        done = _done(c)
        if self.start_done is None:
            self.start_done = done
        el = time.monotonic() - self.t0
        rate = (done - self.start_done) / el if el > 0 else 0.0
        left = total - done
        eta = f"{left / rate:,.0f} s" if rate > 0 and left else "-"
        return (
            f"{done:,}/{total:,} {self.label} done: {c.get('succeeded', 0):,} ok,"
            f" {c.get('failed', 0):,} failed, {c.get('running', 0)} running;"
            f" {rate:,.0f}/s, eta {eta}"
        )

    def __call__(self, counts: dict[str, int], final: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            if not final and now - self.last < self.min_gap:
                return
            self.last = now
            self._render_bar(counts)
        else:
            if not final and now - self.last < self.interval_s:
                return
            self.last = now
            print(self._line(counts), file=self.stream, flush=True)

    def _render_bar(self, c: dict[str, int]) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        total = sum(v for k, v in c.items() if k != "running")
        if self._bar is None:
            from rich.console import Console

            self._bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(), console=Console(file=self.stream), auto_refresh=False,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=total, detail="")
        detail = (
            f"[green]{c.get('succeeded', 0):,} ok[/] [red]{c.get('failed', 0):,} failed[/]"
            f" {c.get('running', 0)} running"
        )
        self._bar.update(self._task, total=total, completed=_done(c), detail=detail)
        self._bar.refresh()

    def close(self, counts: dict[str, int] | None = None) -> None:
        if counts is not None:
            self(counts, final=True)
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

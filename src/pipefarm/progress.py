"""Progress display: a bar on a terminal, plain periodic lines otherwise.

A leaf module (it renders a dict of counts and imports nothing of pipefarm), so that ``run``
can show progress without importing ``observe/``, which sits above it.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import IO, Any


def _done(c: dict[str, int]) -> int:
    return sum(c.get(k, 0) for k in ("succeeded", "failed", "skipped", "cancelled"))


#: the rate (and so the ETA) comes from the tasks that ended in this many recent seconds:
#: long enough to smooth out bursts, short enough to follow a run that speeds up or slows down
RATE_WINDOW_S = 60.0


class ProgressDisplay:
    """Call it with the counts by state; close it at the end.

    Renders only when called (no thread), at most ``fps`` times a second. The total never
    moves backwards (counts taken mid-commit may briefly miss tasks), nor does the number
    done. The rate is tasks ended per second over the last :data:`RATE_WINDOW_S` seconds,
    measured from when the display started (never from the first completion, which would
    count a few tasks ending together as a burst of speed); no ETA until one task has ended.
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
        self.total = total or 0
        self.done = 0
        #: (time, done) samples, oldest first, spanning at most RATE_WINDOW_S
        self._samples: deque[tuple[float, int]] = deque()
        self._bar: Any = None
        self._task: Any = None

    def _update(self, c: dict[str, int]) -> tuple[int, int, float, float | None]:
        """``(done, total, rate, eta_s)`` from the counts, monotone in done and total."""
        now = time.monotonic()
        if not any(v for k, v in c.items() if k != "running"):
            # no counts yet (the coordinator has not read them): a zero here would later
            # read as every earlier-finished task ending now
            return self.done, self.total, 0.0, None
        done = max(self.done, _done(c))
        total = max(self.total, sum(v for k, v in c.items() if k != "running"), done)
        self.done, self.total = done, total
        if self.start_done is None:
            self.start_done = done
            self._samples.append((self.t0, done))
        self._samples.append((now, done))
        while len(self._samples) > 2 and self._samples[1][0] < now - RATE_WINDOW_S:
            self._samples.popleft()
        t_old, d_old = self._samples[0]
        span = now - t_old
        rate = (done - d_old) / span if span > 0 else 0.0
        left = total - done
        eta = left / rate if rate > 0 and left > 0 else None
        return done, total, rate, eta

    def _line(self, c: dict[str, int]) -> str:
        done, total, rate, eta = self._update(c)
        eta_text = f"{eta:,.0f} s" if eta is not None else "-"
        return (
            f"{done:,}/{total:,} {self.label} done: {c.get('succeeded', 0):,} ok,"
            f" {c.get('failed', 0):,} failed, {c.get('running', 0)} running;"
            f" {rate:,.2f}/s, eta {eta_text}"
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
        )

        done, total, rate, eta = self._update(c)
        if self._bar is None:
            from rich.console import Console

            # our own rate and ETA: rich's estimate counts from the first completion it
            # sees, so two tasks ending together read as a burst ("3.4/s, eta 1 s")
            self._bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                TextColumn("{task.fields[eta]}"), console=Console(file=self.stream),
                auto_refresh=False, transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=total, detail="", eta="")
        detail = (
            f"[green]{c.get('succeeded', 0):,} ok[/] [red]{c.get('failed', 0):,} failed[/]"
            f" {c.get('running', 0)} running {rate:,.2f}/s"
        )
        eta_text = f"eta {eta:,.0f} s" if eta is not None else "eta -"
        self._bar.update(self._task, total=total, completed=done, detail=detail, eta=eta_text)
        self._bar.refresh()

    def close(self, counts: dict[str, int] | None = None) -> None:
        if counts is not None:
            self(counts, final=True)
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

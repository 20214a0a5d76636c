"""Failure triage: failed tasks grouped by error signature, biggest group first."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import msgspec

from ..store.sqlite.query import CatalogQuery

_NUM = re.compile(r"(?<![A-Za-z_])[-+]?(?:0x[0-9a-fA-F]+|\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")
_PATH = re.compile(r"(?:/[\w.\-]+){2,}")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_HEX = re.compile(r"\b[0-9a-f]{8,}\b")


class FailureGroup(msgspec.Struct):
    """Failed tasks that share one signature."""

    signature: str
    count: int
    example_task: int
    example_error: str
    task_ids: list[int]


def normalise(line: str) -> str:
    """A message with its variable parts (numbers, paths, quoted values, hashes) blanked."""
    line = _QUOTED.sub("'…'", line)
    line = _PATH.sub("/…", line)
    line = _HEX.sub("#", line)
    line = _NUM.sub("N", line)
    return re.sub(r"\s+", " ", line).strip()


def signature(exit_code: int | None, error: str | None) -> str:
    """``exit N: <normalised last stderr line>`` or ``<Exception>: <normalised message>``."""
    lines = [ln for ln in (error or "").strip().splitlines() if ln.strip()]
    last = lines[-1].strip() if lines else "(no message)"
    if lines and lines[0].startswith("timed out"):
        return "timed out"  # one cause, whatever signal finally ended the process
    if lines and lines[0].startswith("went past its memory limit"):
        return "past its memory limit"  # Python (MemoryError) and commands (group killed) alike
    if exit_code is not None:
        # a command: "exit code N" heads the error, the stderr tail follows
        tail = [ln for ln in lines if not ln.startswith("exit code")]
        msg = normalise(tail[-1]) if tail else "(no stderr)"
        return f"exit {exit_code}: {msg}"
    return normalise(last)


def group_failures(rows: Iterable[tuple[int, int | None, str | None]],
                   examples: int | None = None) -> list[FailureGroup]:
    """Group ``(task, exit_code, error)`` rows by :func:`signature`; each group lists every
    task id (or the first ``examples``: ``count`` still says how many there are)."""
    groups: dict[str, FailureGroup] = {}
    for task, code, err in rows:
        sig = signature(code, err)
        g = groups.get(sig)
        if g is None:
            groups[sig] = FailureGroup(sig, 1, task, (err or "").strip(), [task])
        else:
            g.count += 1
            if examples is None or len(g.task_ids) < examples:
                g.task_ids.append(task)
    return sorted(groups.values(), key=lambda g: (-g.count, g.example_task))


def failures(run: Any) -> list[FailureGroup]:
    """The failure groups of a run."""
    with CatalogQuery.open(run.path) as q:
        return group_failures(q.failed())

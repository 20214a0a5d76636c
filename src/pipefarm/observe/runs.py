"""The runs under a directory, each with its counts and one word for where it stands
(``pipefarm list``).

A run is a directory holding ``catalog.db``; the search never descends into one (its
``logs/`` and ``results/`` hold no runs). Runs with a shared-filesystem part are folded first,
as ``pipefarm status`` does, so that their counts include what array workers journaled.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import states
from ..store.sqlite.query import CatalogQuery

#: how many directory levels below DIR are searched: runs/<project>/<sweep> is found, while a
#: large data tree next to the runs is not walked to its bottom
MAX_DEPTH = 4

#: the state words, in the order a reader looks for trouble
STATES = ("running", "interrupted-resumable", "pending", "failed", "finished", "empty",
          "unreadable")


def find_runs(top: str | os.PathLike[str], max_depth: int = MAX_DEPTH) -> Iterator[Path]:
    """Every run directory at most ``max_depth`` levels below ``top`` (``top`` itself
    included), sorted by path; run directories are not searched further."""
    top = Path(top)
    if (top / "catalog.db").is_file():
        yield top
        return
    level = [top]
    for _ in range(max_depth):
        nxt: list[Path] = []
        for d in level:
            try:
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError:
                continue  # unreadable or vanished: nothing to list there
            for e in entries:
                try:
                    if not e.is_dir(follow_symlinks=False):
                        continue
                except OSError:
                    continue
                p = Path(e.path)
                if (p / "catalog.db").is_file():
                    yield p
                else:
                    nxt.append(p)
        level = nxt
        if not level:
            return


def state_word(counts: dict[str, int], live: bool, started: bool) -> str:
    """One word for a run: running, interrupted-resumable, pending, failed, finished, empty."""
    total = sum(counts.values())
    left = sum(counts[s.label] for s in states.LEFT)
    if total == 0:
        return "empty"
    if live and left:
        return "running"
    if left:
        return "interrupted-resumable" if started else "pending"
    return "finished" if counts["succeeded"] == total else "failed"


def describe(path: Path) -> dict[str, Any]:
    """A run's counts and state word (``state`` "unreadable" with ``error`` if it cannot be
    opened: damaged, from a newer pipefarm; ``unsafe`` when other users can write it)."""
    import warnings

    from ..backends.array import sync
    from ..run import Run
    from .status import being_worked_on

    try:
        with warnings.catch_warnings():  # a run others can write is listed, marked unsafe
            warnings.simplefilter("ignore")
            run = Run.open(path, readonly=True)  # counts only: nothing is unpickled
    except Exception as exc:  # noqa: BLE001 - one bad run must not hide the others
        return {"run": str(path), "state": "unreadable", "total": 0, "counts": {},
                "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
    try:
        sync(run)
        with CatalogQuery.open(path) as q:
            counts = q.counts()
            started = q.started_any()
        left = sum(counts[s.label] for s in states.LEFT)
        live = being_worked_on(run) if left else False
        out = {"run": str(path), "state": state_word(counts, live, started),
               "total": sum(counts.values()), "counts": counts}
        if getattr(run, "unsafe", False):
            out["unsafe"] = "other users can write it: chmod go-w " + str(path)
        return out
    finally:
        run.close()


def list_runs(top: str | os.PathLike[str], max_depth: int = MAX_DEPTH) -> list[dict[str, Any]]:
    """:func:`describe` of every run under ``top``."""
    return [describe(p) for p in find_runs(top, max_depth)]

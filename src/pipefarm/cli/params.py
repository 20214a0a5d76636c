"""Option values the verbs share: task id lists (``--ids``, ``--after``) and timeouts.

Each turns a malformed value into a :class:`click.BadParameter`, which ``pipefarm``
prints as one usage-error line.
"""

from __future__ import annotations

from typing import Any

import click


def _ids(text: str | None) -> list[int] | None:
    """``"1,5,10-20"`` -> ids (:func:`pipefarm.ranges.parse_ids`); a malformed list is a
    usage error."""
    if text is None:
        return None
    from ..ranges import RangeError, parse_ids

    try:
        return parse_ids(text)
    except RangeError as exc:
        raise click.BadParameter(str(exc)) from None


def _spans(ids: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``: ids as the user would type them."""
    parts: list[str] = []
    for i in sorted(ids):
        if parts and parts[-1][1] == i - 1:
            parts[-1][1] = i
        else:
            parts.append([i, i])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts)


def _known(run: Any, ids: list[int], run_dir: str) -> list[int]:
    """``ids``, or a usage error naming those that are not tasks of ``run``."""
    there = {t.id for t in run.tasks(ids=ids)}
    missing = [i for i in set(ids) if i not in there]
    if missing:
        raise click.BadParameter(f"no task {_spans(missing)} in {run_dir}"
                                 f" (it has {len(run):,} task(s))", param_hint="--ids")
    return ids


class _Seconds(click.ParamType):
    """A timeout in seconds: > 0 (``inf``: none); refuses ``nan`` and non-positive values."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None or not isinstance(value, str):
            return value
        from ..errors import SubmissionError
        from ..run import checked_timeout

        try:
            return checked_timeout(value)
        except SubmissionError:
            self.fail(f"{value!r} is not a number of seconds > 0 (inf: no timeout)", param, ctx)


class _BackendName(click.ParamType):
    """A backend's name: a built-in one or one a package registers in the ``pipefarm.backends``
    entry-point group; an unknown name lists the installed ones."""

    name = "name"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from ..backends.base import installed

        names = installed()
        if value not in names:
            self.fail(f"unknown backend {value!r}; installed: {', '.join(names)}", param, ctx)
        return value


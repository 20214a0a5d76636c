"""The one parser of number lists as users type them: ``"1,5,10-20"``, ``"0-99:2"``.

``--ids`` and ``--after`` (task ids) and ``--array`` (indices) all read this syntax, so they
accept the same things and refuse them with the same words. It imports nothing of pipefarm:
any layer may use it.
"""

from __future__ import annotations

import re

#: one comma-separated part: ``N``, ``LO-HI`` or (with steps) ``LO-HI:STEP`` / ``N:STEP``
_PART = re.compile(r"(\d+)(?:\s*-\s*(\d+))?(?:\s*:\s*(\d+))?")

#: how a message names one number and several: (with its article, plural)
_NOUNS = {"id": ("an id", "task ids"), "index": ("an index", "indices")}


class RangeError(ValueError):
    """A number list that does not parse; the message names the part and how to write it."""


def parse_ranges(text: str, *, what: str = "id", steps: bool = False) -> list[range]:
    """``"1,5,10-20"`` -> ``[range(1, 2), range(5, 6), range(10, 21)]``: inclusive ranges.

    Parts are separated by commas; blanks around them and around ``-`` are ignored, as are
    empty parts. With ``steps``, ``LO-HI:STEP`` takes every STEP-th number. ``what`` (``"id"``
    or ``"index"``) names the numbers in messages. Raises :class:`RangeError` for a part that
    is not a number or a range, a range written high-low, a step below 1, or a list that
    names no number at all.
    """
    one, many = _NOUNS[what]
    out: list[range] = []
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        m = _PART.fullmatch(part)
        if m is None or (m.group(3) is not None and not steps):
            like = "10-20 or 0-99:2" if steps else "10-20"
            raise RangeError(f"{part!r} is not {one} or a range like {like}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        step = int(m.group(3)) if m.group(3) is not None else 1
        if lo > hi:
            raise RangeError(f"{part!r} is an empty range: write it low-high, e.g. {hi}-{lo}")
        if step < 1:
            raise RangeError(f"{part!r} has step {step}: a step is 1 or more")
        out.append(range(lo, hi + 1, step))
    if not out:
        raise RangeError(f"{text!r} names no {many}; give {many} or ranges like 7,12-20")
    return out


def parse_ids(text: str) -> list[int]:
    """``"1,5,10-20"`` -> every id it names, in the order given (see :func:`parse_ranges`)."""
    return [i for r in parse_ranges(text) for i in r]

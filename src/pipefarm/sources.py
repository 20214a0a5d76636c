"""Where the placeholder values of ``pipefarm submit`` come from: one dict per task.

Every source is a generator that reads its input as it goes, so a file of ten million lines
costs memory for one line at a time. Values are strings; text is decoded as UTF-8 with
``surrogateescape`` so that bytes which are not UTF-8 (file names on POSIX are bytes) reach
the command unchanged.

Check the template against the first row with :func:`check_template` before writing anything,
and use :func:`checked` to catch a later row that lacks a column.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from .execute.template import (
    EMPTY_PLACEHOLDER_HINT,
    Command,
    TemplateError,
    literal_braces,
    render,
)
from .ranges import RangeError, parse_ranges

_ENC = {"encoding": "utf-8", "errors": "surrogateescape"}
# structured text as spreadsheets write it: a leading UTF-8 byte-order mark is not data
_ENC_SIG = {"encoding": "utf-8-sig", "errors": "surrogateescape"}
_MAX_ELEMENT = 1 << 26  # characters one JSON element may span before we call it malformed
# characters one CSV cell may hold: Python's csv module stops at 128 KiB by default, too
# little for a sequence or an embedded document; an unclosed quote still ends at this bound
# instead of swallowing the whole file into memory
_MAX_CSV_FIELD = 1 << 26


def _ranges(spec: str) -> list[range]:
    """The ranges of an ``--array`` spec (:func:`pipefarm.ranges.parse_ranges`, with steps)."""
    try:
        return parse_ranges(spec, what="index", steps=True)
    except RangeError as exc:
        raise ValueError(f"bad array spec {spec!r}: {exc}") from None


def array_size(spec: str) -> int:
    """How many tasks :func:`array_source` yields for ``spec`` (without generating them)."""
    return sum(len(r) for r in _ranges(spec))


def array_value_bytes(spec: str) -> int:
    """Bytes of placeholder value an ``--array`` task holds at most: the digits of its largest
    index (for :func:`catalog_estimate`)."""
    return max(len(str(r[-1])) for r in _ranges(spec))


def array_source(spec: str) -> Iterator[dict[str, str]]:
    """``{"index": "..."}`` for each index of ``"0-9999"``, ``"0-99:2"`` or ``"1,5,7"``.

    Ranges are inclusive (as in job arrays) and may be combined: ``"1-3,10-20:5"``.
    Raises ValueError for a malformed spec at once (before the first value).
    """
    ranges = _ranges(spec)

    def gen() -> Iterator[dict[str, str]]:
        for r in ranges:
            for i in r:
                yield {"index": str(i)}

    return gen()


def _lines(path: str | Path) -> Iterator[str]:
    # binary: only "\n" (or "\r\n") ends a line; text mode would split on a lone "\r" too
    with open(path, "rb") as f:
        for raw in f:
            if raw.endswith(b"\n"):
                raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            yield raw.decode("utf-8", "surrogateescape")


def file_source(path: str | Path) -> Iterator[dict[str, str]]:
    """One task per line: ``{"line": line, "0": field0, "1": field1, ...}``.

    The line is kept exactly but for its line ending (``\\n`` or ``\\r\\n``); fields are split
    on runs of whitespace. Blank lines (empty or only whitespace) are skipped: they would
    otherwise become tasks with an empty ``{line}``.
    """
    for line in _lines(path):
        if not line.strip():
            continue
        row = {"line": line}
        for i, field in enumerate(line.split()):
            row[str(i)] = field
        yield row


def csv_source(path: str | Path, delimiter: str = ",") -> Iterator[dict[str, str]]:
    """One task per CSV row; the header row names the placeholders (``{sample}``, ...).

    Blank rows are skipped. A row with more or fewer cells than the header has raises
    ValueError with its line number (a missing cell is a mistake, not an empty value). A UTF-8
    byte-order mark at the start of the file (as Excel writes it) is dropped.
    """
    import csv

    if csv.field_size_limit() < _MAX_CSV_FIELD:  # process-wide; only ever raised
        csv.field_size_limit(_MAX_CSV_FIELD)
    with open(path, newline="", **_ENC_SIG) as f:  # type: ignore[call-overload]
        reader = csv.reader(f, delimiter=delimiter)
        try:
            yield from _csv_rows(path, reader)
        except csv.Error as exc:  # a cell over the bound, a NUL byte, ...: name the line
            raise ValueError(f"{path}, line {reader.line_num}: {exc}") from None


def _csv_rows(path: str | Path, reader: Any) -> Iterator[dict[str, str]]:
    """The rows of :func:`csv_source`, named by the header row."""
    header = next(reader, None)
    if header is None:
        return
    names = [h.strip() for h in header]
    if any(not n for n in names):
        raise ValueError(f"{path}: the header row has an empty column name: {header!r}")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{path}: the header row names {dup} more than once")
    width = len(names)
    for row in reader:
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != width:
            n = len(row)
            raise ValueError(
                f"{path}, line {reader.line_num}: {n} cell{'s' if n != 1 else ''} but the"
                f" header has {width}"
            )
        yield dict(zip(names, row, strict=True))


def _str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):  # spelled as in the file, not Python's True/False
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    import json

    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _row(obj: Any, where: str) -> dict[str, str]:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
    return {str(k): _str(v) for k, v in obj.items()}


def json_source(path: str | Path) -> Iterator[dict[str, str]]:
    """One task per object of a JSON list (``[{"a": 1}, ...]``), or per line of JSON Lines.

    Values become strings: numbers as written by ``str``, booleans as ``true``/``false``,
    null as ``""``, lists and objects as compact JSON. The list is parsed one element at a
    time, never loaded whole. A UTF-8 byte-order mark at the start is dropped.
    """
    import json

    decoder = json.JSONDecoder()
    with open(path, **_ENC_SIG) as f:  # type: ignore[call-overload]
        buf = ""
        eof = False

        def fill(at_least: int = 1 << 16) -> bool:
            nonlocal buf, eof
            if eof:
                return False
            chunk = f.read(at_least)
            if not chunk:
                eof = True
                return False
            buf += chunk
            return True

        def skip_ws(pos: int) -> int:
            nonlocal buf
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or not fill():
                    return pos

        pos = skip_ws(0)
        if pos >= len(buf):
            return  # empty file: no tasks
        if buf[pos] == "{":  # JSON Lines (or concatenated objects)
            array = False
        elif buf[pos] == "[":
            array = True
            pos += 1
        else:
            raise ValueError(f"{path}: expected a JSON list of objects or JSON Lines")
        n = 0
        while True:
            pos = skip_ws(pos)
            if array and pos < len(buf) and buf[pos] == "]":
                pos = skip_ws(pos + 1)
                if pos < len(buf):
                    raise ValueError(f"{path}: unexpected data after the closing ']'")
                return
            if pos >= len(buf):
                if array:
                    raise ValueError(f"{path}: the JSON list is not closed (missing ']')")
                return
            if pos > 1 << 16:  # drop what is parsed: memory stays about one chunk
                buf, pos = buf[pos:], 0
            need = 1 << 16
            while True:  # decode one element; read more while it is cut off
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as exc:
                    # a cut-off element and a malformed one look alike: read on, up to a bound
                    if len(buf) - pos > _MAX_ELEMENT or not fill(need):
                        raise ValueError(f"{path}: element {n}: {exc}") from None
                    need *= 2  # a big element: read in growing chunks, not quadratically
            yield _row(obj, f"{path}: element {n}")
            n += 1
            pos = skip_ws(end)
            if array:
                if pos >= len(buf):
                    raise ValueError(f"{path}: the JSON list is not closed (missing ']')")
                if buf[pos] == ",":
                    pos += 1
                elif buf[pos] != "]":
                    raise ValueError(f"{path}: expected ',' or ']' after element {n - 1}")


#: Catalog bytes per task besides its values: measured with ``pipefarm submit RUN --array
#: 0-999999 -- echo {index}`` (catalog.db: 63.7 MB for 1,000,000 tasks of ~6-digit values).
CATALOG_BYTES_PER_TASK = 58
#: Tasks in one submission from which ``pipefarm submit`` first says how many and how much
#: disk (100,000,000 tasks make a catalog of ~6.6 GB); ``PIPEFARM_LARGE_SUBMISSION`` overrides.
LARGE_SUBMISSION = 1_000_000


def catalog_estimate(tasks: int, value_bytes: float) -> int:
    """Roughly how many bytes of catalog ``tasks`` tasks take, each with ``value_bytes`` of
    placeholder values (index digits, ::: values)."""
    return int(tasks * (CATALOG_BYTES_PER_TASK + value_bytes))


#: The GNU parallel separators: ``::: VALUE...`` and ``:::: FILE...`` (one value per line).
ARGS_SEP, FILES_SEP = ":::", "::::"


def split_inline_args(words: Iterable[str]) -> tuple[list[str], list[list[str]] | None]:
    """Split ``CMD... ::: a b ::: 1 2 :::: FILE`` into the command and its input groups.

    As GNU parallel reads them: each ``:::`` starts a group of the values after it; each
    FILE after ``::::`` is a group of its own, one value per line (line ending dropped, blank
    lines skipped as ``--from-file`` does). Returns ``(command words, groups)``, groups None
    without a separator. Raises ValueError for an empty group or a file that cannot be read.
    """
    words = list(words)
    at = next((i for i, w in enumerate(words) if w in (ARGS_SEP, FILES_SEP)), None)
    if at is None:
        return words, None
    groups: list[list[str]] = []
    sep, files_seen = None, 0
    for w in words[at:]:
        if w in (ARGS_SEP, FILES_SEP):
            if sep == ARGS_SEP and not groups[-1] or sep == FILES_SEP and files_seen == 0:
                raise ValueError(f"nothing after {sep!r}: give it at least one value")
            sep, files_seen = w, 0
            if w == ARGS_SEP:
                groups.append([])
        elif sep == ARGS_SEP:
            groups[-1].append(w)
        else:
            try:
                values = [ln for ln in _lines(w) if ln.strip()]
            except OSError as exc:
                raise ValueError(f"{FILES_SEP} {w}: {exc.strerror or exc}") from None
            if not values:
                raise ValueError(f"{FILES_SEP} {w}: the file has no values (no non-blank line)")
            groups.append(values)
            files_seen += 1
    if sep == ARGS_SEP and not groups[-1] or sep == FILES_SEP and files_seen == 0:
        raise ValueError(f"nothing after {sep!r}: give it at least one value")
    return words[:at], groups


def inline_size(groups: list[list[str]]) -> int:
    """How many tasks :func:`inline_source` yields: the product of the group sizes."""
    n = 1
    for g in groups:
        n *= len(g)
    return n


def inline_source(groups: list[list[str]]) -> Iterator[dict[str, str]]:
    """``{"1": a, "2": b, ...}`` for every combination of the groups, in GNU parallel's order.

    The last group varies fastest: ``::: a b ::: 1 2`` gives a 1, a 2, b 1, b 2.
    """
    import itertools

    names = [str(i) for i in range(1, len(groups) + 1)]
    for combo in itertools.product(*groups):
        yield dict(zip(names, combo, strict=True))


class Chosen(NamedTuple):
    """The one source a submission names, as :func:`choose` opens it."""

    rows: Iterator[dict[str, str]] | None  #: None: no source (one task)
    size: int | None  #: tasks it yields, when known before reading (--array, :::)
    value_bytes: float  #: placeholder bytes per task, for :func:`catalog_estimate`
    only: str | None  #: the column ``{}`` stands for (a source of one column)


def choose(*, array: str | None = None, from_file: str | None = None,
           from_csv: str | None = None, from_json: str | None = None,
           groups: list[list[str]] | None = None) -> Chosen:
    """Open the one source given (``pipefarm submit``'s --array, --from-file, --from-csv,
    --from-json or ::: groups); with none, ``rows`` is None.

    Streams: a CSV or JSON source is read only as far as its first row (to learn whether it
    has one column). Raises ValueError for a malformed spec or a first row that cannot be read.
    """
    if array is not None:
        return Chosen(array_source(array), array_size(array), array_value_bytes(array), "index")
    if from_file is not None:
        return Chosen(file_source(from_file), None, 0.0, "line")
    if groups is not None:
        return Chosen(inline_source(groups), inline_size(groups),
                      sum(sum(map(len, g)) / len(g) for g in groups),
                      "1" if len(groups) == 1 else None)
    if from_csv is not None or from_json is not None:
        rows = csv_source(from_csv) if from_csv is not None else json_source(from_json)  # type: ignore[arg-type]
        first = next(rows, None)  # a one-column source: {} is that column
        if first is None:
            return Chosen(iter(()), None, 0.0, None)
        only = next(iter(first)) if len(first) == 1 else None
        return Chosen(itertools.chain([first], rows), None, 0.0, only)
    return Chosen(None, None, 0.0, None)


def source_for(path: str | Path) -> Iterator[dict[str, str]]:
    """The source a file's extension implies: .csv, .tsv, .json/.jsonl, else lines."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return csv_source(path)
    if suffix == ".tsv":
        return csv_source(path, delimiter="\t")
    if suffix in (".json", ".jsonl", ".ndjson"):
        return json_source(path)
    return file_source(path)


def check_template(
    placeholders: set[str], first_values: dict[str, str] | None, command: Command | None = None
) -> None:
    """Refuse a template that uses a placeholder the source does not provide.

    Call with the first row before anything is written. Raises
    :class:`~pipefarm.execute.template.TemplateError` naming the missing and the available names.
    ``{}`` (placeholder name ``""``) is provided by a row with exactly one value. With
    ``command``, also refuse literal brace text that names a column (``{my-col}``: not an
    identifier, so not a placeholder), which would otherwise pass silently.
    """
    if first_values is None:
        if placeholders:
            raise TemplateError("the value source is empty: no task to fill the template")
        return
    missing = sorted(
        p for p in placeholders - first_values.keys() if not (p == "" and len(first_values) == 1)
    )
    if missing:
        have = ", ".join("{" + k + "}" for k in sorted(first_values, key=_name_order)) or "none"
        hint = f"; {EMPTY_PLACEHOLDER_HINT}" if "" in missing else ""
        word = next((m for m in missing if m and not m.isdigit()), None)
        if word is not None:  # awk's '{print}' is a placeholder by the rules: say how not
            hint += f"; if {{{word}}} is meant literally (awk, shell), write {{{{{word}}}}}"
        raise TemplateError(
            f"the command uses {', '.join('{' + m + '}' for m in missing)} but the source "
            f"provides no such value; available: {have}{hint}"
        )
    if command is not None:
        named = sorted((literal_braces(command) - placeholders) & first_values.keys())
        if named:
            raise TemplateError(
                f"{{{named[0]}}} names a column of the source but is not a placeholder: "
                "placeholder names are identifiers (letters, digits, _); rename the column, "
                f"or write {{{{{named[0]}}}}} for the literal text"
            )


def _name_order(name: str) -> tuple[int, int, str]:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def checked(
    rows: Iterable[dict[str, str]], placeholders: set[str], command: Command | None = None
) -> Iterator[dict[str, str]]:
    """Pass rows through, raising TemplateError at the first row that lacks a placeholder.

    The first row is checked before it is yielded; a later bad row (a short line in a file
    source) raises with its row number, so a caller writing in one transaction can roll back.
    """
    it = iter(rows)
    first = next(it, None)
    check_template(placeholders, first, command)
    if first is None:
        return
    if command is not None:
        render(command, first)  # a bad format spec ({index:zz}) fails here, not in every task
    yield first
    for n, row in enumerate(it, start=2):
        if not placeholders <= row.keys():
            try:
                check_template(placeholders, row)  # literal braces: checked on the first row
            except TemplateError as exc:
                raise TemplateError(f"row {n}: {exc}") from None
        yield row

"""Results as a table (``Run.results``); the streamed files of ``pipefarm results`` are in :mod:`.export`.

The ``result`` column holds the data, never a ``repr``:

- **typed** when Arrow gives every value back unchanged: the same Python type and value, a
  ``dict`` as a struct, a ``list`` as a list (an ``int`` may widen to ``float`` where the float
  holds it exactly);
- otherwise **pickled**: a ``binary`` column of each value's pickle, the field's metadata
  ``{b"pipefarm.encoding": b"pickle"}``. Decode a value with ``pickle.loads``, or ask
  ``Run.results(as_objects=True)`` for rows that hold the objects themselves.

Exports cannot hold pickles sensibly: there a pickled column becomes JSON text (metadata
``{b"pipefarm.encoding": b"json"}`` in Parquet), and a value that JSON cannot encode becomes the
marker ``<not JSON-encodable: TYPE>``. CSV cannot hold nested or binary values either, so those
become JSON text there too; Parquet keeps every typed column as it is. Files are written to a
temporary file in the same directory and renamed over the target: a failed export leaves the
earlier file as it was.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from typing import IO, Any

from ..run import RESULT_COLUMNS
from ..states import Outcome, State
from ..store.sqlite.query import CatalogQuery

# json, tempfile and datetime are imported where they are used: exporting is rare
#: field metadata key naming how a ``result`` column is encoded (absent: typed)
ENCODING = b"pipefarm.encoding"
PICKLE = b"pickle"
JSON = b"json"

#: Arrow types of the columns whose type must not follow their values (an all-None column would
#: come out null-typed); the others are inferred
COLUMN_TYPES = {"started_at": "float64", "ended_at": "float64", "duration_s": "float64",
                "exit_code": "int64", "key": "string", "error": "string", "worker": "string",
                "peak_memory": "int64", "outcome": "string"}


def result_rows(run: Any) -> tuple[dict[str, list[Any]], list[bytes | None]]:
    """Every task's row as columns, results as Python objects, and each result's pickle."""
    cols: dict[str, list[Any]] = {c: [] for c in RESULT_COLUMNS}
    blobs: list[bytes | None] = []
    succeeded = int(State.SUCCEEDED)
    labels = {int(s): s.label for s in State}
    with CatalogQuery.open(run.path) as q:
        for (tid, key, st, att, code, blob, rfile, err, t0, t1, worker, peak,
             outcome) in q.results():
            cols["task_id"].append(tid)
            cols["key"].append(key)
            cols["state"].append(labels[st])
            cols["attempts"].append(att)
            cols["exit_code"].append(code)
            value = None
            if st == succeeded:  # other states keep a pickled exception there, not a result
                if rfile is not None:
                    blob = (run.path / rfile).read_bytes()
                value = pickle.loads(blob) if blob is not None else None
            blobs.append(blob if value is not None else None)
            cols["result"].append(value)
            cols["error"].append(err)
            cols["started_at"].append(t0)
            cols["ended_at"].append(t1)
            cols["duration_s"].append(t1 - t0 if t0 is not None and t1 is not None else None)
            cols["worker"].append(worker)
            cols["peak_memory"].append(peak)
            # how the task's latest attempt ended: cached marks a result from the result cache
            cols["outcome"].append(None if outcome is None else Outcome(outcome).label)
    return cols, blobs


def results_table(run: Any) -> Any:
    """The ``pyarrow.Table`` of ``Run.results`` (see the module docstring for ``result``)."""
    import pyarrow as pa

    cols, blobs = result_rows(run)
    fields, arrays = [], []
    for c in RESULT_COLUMNS:
        if c == "result":
            arr, field = result_column(cols[c], blobs)
        else:
            arr = pa.array(cols[c], getattr(pa, COLUMN_TYPES[c])() if c in COLUMN_TYPES else None)
            field = pa.field(c, arr.type)
        fields.append(field)
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def result_column(values: list[Any], blobs: list[bytes | None]) -> tuple[Any, Any]:
    """``(array, field)`` for the result column: typed if Arrow keeps every value, else pickles."""
    import pyarrow as pa

    try:
        arr = pa.array(values)
        if all(map(_same, values, arr.to_pylist())):
            return arr, pa.field("result", arr.type)
    except Exception:  # noqa: BLE001 - any refusal by Arrow means: not one Arrow type
        pass
    arr = pa.array(blobs, pa.binary())
    return arr, pa.field("result", pa.binary(), metadata={ENCODING: PICKLE})


def _same(v: Any, back: Any) -> bool:
    """Whether Arrow gave ``v`` back as ``back`` unchanged (type included)."""
    if v is None:
        return back is None
    t = type(v)
    if t is bool:
        return back is v
    if t is int:
        if type(back) is float:  # widened in a column that also holds floats: exact only
            return float(v) == back and int(back) == v
        return type(back) is int and back == v
    if t is float:
        return type(back) is float and (back == v or (back != back and v != v))
    if t is list:
        return type(back) is list and len(back) == len(v) and all(map(_same, v, back))
    if t is dict:
        return (type(back) is dict and back.keys() == v.keys()
                and all(_same(x, back[k]) for k, x in v.items()))
    if t.__module__ == "numpy" and hasattr(v, "dtype") and not getattr(v, "shape", ()):
        kind = v.dtype.kind  # a numpy scalar comes back as the Python number it holds
        if kind == "b":
            return type(back) is bool and back == bool(v)
        if kind in "iu":
            return _same(int(v), back)
        if kind == "f":
            return _same(float(v), back)
        return False
    return type(back) is t and bool(back == v)


# --- exports ------------------------------------------------------------------------------------
def marker(value: Any) -> str:
    """What an export shows for a value JSON cannot encode."""
    t = type(value)
    name = t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
    return f"<not JSON-encodable: {name}>"


class _NotJSON(Exception):
    pass


def _plain(v: Any) -> Any:
    """``v`` as JSON's types (tuples as lists, dates as ISO text); _NotJSON if it cannot be."""
    import datetime as _dt

    if v is None or isinstance(v, (str, bool, int, float)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise _NotJSON  # JSON would turn other keys into text: not the same value
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (_dt.datetime, _dt.date, _dt.time)):
        return v.isoformat()
    raise _NotJSON


def jsonable(value: Any) -> Any:
    """``value`` ready for ``json.dumps``, or :func:`marker` text for what JSON cannot encode."""
    try:
        return _plain(value)
    except (_NotJSON, RecursionError):
        return marker(value)


def _dumps(obj: Any) -> str:
    """JSON text, readable (not ASCII-escaped) unless it holds lone surrogates (bytes that
    were not UTF-8, decoded with ``surrogateescape``), which UTF-8 cannot carry."""
    import json

    text = json.dumps(obj, ensure_ascii=False)
    try:
        text.encode()
    except UnicodeEncodeError:
        text = json.dumps(obj)
    return text


def json_text(value: Any) -> str | None:
    """One value as JSON text (None stays None, a null), or the bare :func:`marker` (not
    JSON, so that it cannot be mistaken for a string result)."""
    if value is None:
        return None
    try:
        return _dumps(_plain(value))
    except (_NotJSON, RecursionError):
        return marker(value)


def _objects(col: Any, encoding: bytes | None) -> list[Any]:
    values = col.to_pylist()
    if encoding == PICKLE:
        return [None if b is None else pickle.loads(b) for b in values]
    return values


def export_table(table: Any, fmt: str) -> Any:
    """``table`` as a file of format ``fmt`` (parquet, csv) can hold it (module docstring)."""
    import pyarrow as pa

    out = table
    for i, field in enumerate(table.schema):
        enc = (field.metadata or {}).get(ENCODING)
        t = field.type
        text = enc == PICKLE or (fmt == "csv" and (
            pa.types.is_nested(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)
            or pa.types.is_fixed_size_binary(t)))
        if not text:
            continue
        values = [json_text(v) for v in _objects(table.column(i), enc)]
        meta = {ENCODING: JSON} if fmt == "parquet" else None
        out = out.set_column(i, pa.field(field.name, pa.string(), metadata=meta),
                             pa.array(values, pa.string()))
    return out


def json_lines(table: Any) -> Iterable[str]:
    """One JSON object per row; results as JSON values (or markers), never pickles."""
    cols = []
    for i, field in enumerate(table.schema):
        cols.append((field.name, _objects(table.column(i), (field.metadata or {}).get(ENCODING))))
    names = [n for n, _ in cols]
    for row in zip(*(v for _, v in cols), strict=True):
        yield _dumps({n: jsonable(v) for n, v in zip(names, row, strict=True)}) + "\n"


def write(table: Any, fmt: str, dest: IO[bytes]) -> None:
    """Write ``table`` to the open binary file ``dest`` in format ``fmt``."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(export_table(table, fmt), dest)
    elif fmt == "csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(export_table(table, fmt), dest)
    else:
        for line in json_lines(table):
            dest.write(line.encode())

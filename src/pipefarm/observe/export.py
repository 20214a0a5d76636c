"""Results as files (``pipefarm results``): streamed in record batches, whatever the run's size.

Each batch holds :data:`~pipefarm.run.RESULT_COLUMNS`, then :data:`EXTRA_COLUMNS`, then one
``param_<name>`` column per placeholder of command tasks. The result column is typed or
pickled as :mod:`.results` decides, one decision for the whole file; an export turns a pickled
column into JSON text. Files are written to a temporary file in the same directory and renamed
over the target: a failed export leaves the earlier file as it was.
"""

from __future__ import annotations

import os
import pickle
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from ..run import RESULT_COLUMNS
from ..states import Outcome, State
from ..store.sqlite.query import CatalogQuery
from ..task import INLINE_RESULT_MAX
from .results import COLUMN_TYPES, ENCODING, PICKLE, export_table, json_lines, result_column

#: columns an export adds after :data:`RESULT_COLUMNS`, before one ``param_<name>`` column per
#: placeholder value of command tasks (the source row: a sweep's CSV joins on them)
EXTRA_COLUMNS = ("command", "stdout_tail")
#: prefix of the columns holding a command task's placeholder values (text, as in the source)
PARAM_PREFIX = "param_"
#: export formats; ``json`` is one JSON array, ``jsonl`` one JSON object per line
FORMATS = ("parquet", "csv", "json", "jsonl")
#: bytes of stdout an export keeps per task: room for a last line or a short summary, while a
#: million-task export stays small (the whole output: ``pipefarm logs RUN ID``)
STDOUT_TAIL_BYTES = 1024
#: rows per record batch while exporting ...
EXPORT_BATCH_ROWS = 4096
#: ... or fewer, once the batch's results reach this many bytes: an export's peak memory is
#: the interpreter and Arrow (~80 MB) plus about eight batches in their stages (pickles,
#: objects, Arrow arrays, the converted copy), whatever the size of the run. 200 MB of
#: results export at a 140-190 MB peak with 8 MiB (4 MiB: 120-140 MB, but Parquet row
#: groups of a few dozen rows; 64 MiB: 510-560 MB)
EXPORT_BATCH_BYTES = 8 << 20

_TS = ("started_at", "ended_at")


class _Spec:
    """What an export needs of one spec: its command template, or nothing (Python tasks)."""

    def __init__(self, kind: str, payload: bytes) -> None:
        self.cmd = None
        if kind == "cmd":
            from ..execute.template import decode_command

            try:
                self.cmd = decode_command(payload)
            except Exception:  # noqa: BLE001 - an unreadable template: no command column
                self.cmd = None


def _specs(run: Any) -> dict[int, _Spec]:
    with CatalogQuery.open(run.path) as q:
        return {sid: _Spec(kind, payload) for sid, kind, payload in q.spec_rows()}


def _values(spec: _Spec | None, args: bytes | None) -> dict[str, str]:
    if spec is None or spec.cmd is None:
        return {}
    from ..execute.template import decode_values

    try:
        return decode_values(args)
    except Exception:  # noqa: BLE001 - unreadable values: the row still exports
        return {}


def command_text(cmd: Any, values: dict[str, str]) -> str | None:
    """The command one task ran, as one line (a shell line as written, argv shell-quoted)."""
    import shlex

    from ..execute.template import render

    try:
        argv = render(cmd, values)
    except Exception:  # noqa: BLE001 - a template this row cannot fill: no command to show
        return None
    return argv[2] if cmd.shell is not None else shlex.join(argv)


def stdout_extents(ref: str | None) -> tuple[str, list[tuple[int, int]]] | None:
    """``(file relative to the log folder, [(offset, length)...])`` of an output reference's
    stdout, or None when it printed nothing (format: :mod:`pipefarm.execute.output`)."""
    if not ref:
        return None
    from ..execute.output import SUFFIXES, TASKS_DIRNAME

    try:
        first, _second, name = ref[1:].split("/", 2)
        if "/" in name or name in ("", ".", ".."):
            return None
        if ref[0] == "s" and first:
            ext = []
            for item in first.split(","):
                off, _, n = item.partition("+")
                ext.append((int(off), int(n)))
            return name + SUFFIXES[0], ext
        if ref[0] == "t" and int(first or 0):
            return f"{TASKS_DIRNAME}/{name}{SUFFIXES[0]}", [(0, int(first))]
    except ValueError:
        return None
    return None


def stdout_tail(run_dir: Path, ref: str | None, limit: int = STDOUT_TAIL_BYTES) -> str | None:
    """The last ``limit`` bytes of an attempt's stdout as text (None: nothing, or unreadable)."""
    where = stdout_extents(ref)
    if where is None:
        return None
    from ..execute.output import _locate, _read_extents

    name, extents = where
    tail: list[tuple[int, int]] = []
    want = limit
    for off, n in reversed(extents):  # only the bytes the tail needs are read
        take = min(n, want)
        tail.insert(0, (off + n - take, take))
        want -= take
        if not want:
            break
    try:
        data = _read_extents(_locate(run_dir, name), tail)
    except OSError:
        return None
    return data.decode("utf-8", "replace")


class _MissingResult(Exception):
    """A succeeded task's large-result file is gone (deleted, or a copy of the run without it)."""


def _result_of(run: Any, st: int, blob: bytes | None, rfile: str | None) -> tuple[Any, bytes | None]:
    if st != int(State.SUCCEEDED):  # other states keep a pickled exception there, not a result
        return None, None
    if rfile is not None:
        try:
            blob = (run.path / rfile).read_bytes()
        except FileNotFoundError:
            raise _MissingResult(rfile) from None
    value = pickle.loads(blob) if blob is not None else None
    return value, (blob if value is not None else None)


def _result_or_none(run: Any, st: int, blob: bytes | None, rfile: str | None) -> Any:
    try:
        return _result_of(run, st, blob, rfile)[0]
    except _MissingResult:
        return None


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return INLINE_RESULT_MAX  # reading it will say what is wrong; count it as large


def _chunks(run: Any) -> Iterable[list[tuple[Any, ...]]]:
    """The catalog's export rows in chunks bounded by rows and by result bytes."""
    chunk: list[tuple[Any, ...]] = []
    size = 0
    with CatalogQuery.open(run.path) as q:
        for row in q.export_rows():
            chunk.append(row)
            size += len(row[5] or b"") + (_file_size(run.path / row[6]) if row[6] else 0)
            if len(chunk) >= EXPORT_BATCH_ROWS or size >= EXPORT_BATCH_BYTES:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


def _plan(run: Any, specs: dict[int, _Spec]) -> tuple[Any, list[str]]:
    """First pass: the result column's type (None: pickled) and the placeholder names.

    The result column is typed when every batch's values come back from Arrow unchanged and
    all batches agree on one type; otherwise pickled (exports: JSON text) -- one decision for
    the whole file, made without holding more than a batch.
    """
    import pyarrow as pa

    names: dict[str, None] = {}
    rtype: Any = None
    pickled = False
    for chunk in _chunks(run):
        values = []
        for row in chunk:
            for k in _values(specs.get(row[11]), row[12]):
                names.setdefault(k)
            if not pickled:
                values.append(_result_or_none(run, row[2], row[5], row[6]))
        if pickled or all(v is None for v in values):
            continue
        arr, field = result_column(values, [None] * len(values))
        if (field.metadata or {}).get(ENCODING) == PICKLE:
            pickled = True
        elif rtype is None or rtype == pa.null():
            rtype = arr.type
        elif arr.type != rtype and arr.type != pa.null():
            pickled = True  # batches disagree (e.g. ints here, text there): one column cannot
    return (None if pickled else (rtype or pa.null())), list(names)


def result_batches(run: Any) -> Iterable[Any]:
    """The export's record batches: :data:`RESULT_COLUMNS` with ``started_at``/``ended_at``
    as ``timestamp[us, tz=UTC]``, then :data:`EXTRA_COLUMNS`, then one ``param_<name>``
    column per placeholder. At least one batch (maybe empty), all with one schema."""
    import pyarrow as pa

    specs = _specs(run)
    rtype, names = _plan(run, specs)
    ts = pa.timestamp("us", tz="UTC")
    types = {**{c: getattr(pa, t)() for c, t in COLUMN_TYPES.items()}, "task_id": pa.int64(),
             "state": pa.string(), "attempts": pa.int64(), "started_at": ts, "ended_at": ts,
             "command": pa.string(), "stdout_tail": pa.string()}
    rfield = (pa.field("result", pa.binary(), metadata={ENCODING: PICKLE}) if rtype is None
              else pa.field("result", rtype))
    fields = [rfield if c == "result" else pa.field(c, types[c])
              for c in (*RESULT_COLUMNS, *EXTRA_COLUMNS)]
    fields += [pa.field(PARAM_PREFIX + n, pa.string()) for n in names]
    schema = pa.schema(fields)
    labels = {int(s): s.label for s in State}
    base = Path(run.path)
    sent = False
    missing = 0
    for chunk in _chunks(run):
        cols: dict[str, list[Any]] = {f.name: [] for f in fields}
        for (tid, key, st, att, code, blob, rfile, err, t0, t1, worker, sid, args,
             out, peak, outcome) in chunk:
            spec = specs.get(sid)
            values = _values(spec, args)
            try:
                value, blob = _result_of(run, st, blob, rfile)
            except _MissingResult:  # export the rest; this row says what happened to it
                value = blob = None
                missing += 1
                err = f"pipefarm: its result file {rfile} is missing; the result is lost"
            cols["task_id"].append(tid)
            cols["key"].append(key)
            cols["state"].append(labels[st])
            cols["attempts"].append(att)
            cols["exit_code"].append(code)
            cols["result"].append(value if rtype is not None else blob)
            cols["error"].append(err)
            cols["started_at"].append(None if t0 is None else round(t0 * 1e6))
            cols["ended_at"].append(None if t1 is None else round(t1 * 1e6))
            cols["duration_s"].append(t1 - t0 if t0 is not None and t1 is not None else None)
            cols["worker"].append(worker)
            cols["peak_memory"].append(peak)
            cols["outcome"].append(None if outcome is None else Outcome(outcome).label)
            cmd = spec.cmd if spec is not None else None
            cols["command"].append(command_text(cmd, values) if cmd is not None else None)
            cols["stdout_tail"].append(stdout_tail(base, out) if cmd is not None else None)
            for n in names:
                cols[PARAM_PREFIX + n].append(values.get(n))
        arrays = []
        for f in fields:
            if f.name in _TS:
                arrays.append(pa.array(cols[f.name], pa.int64()).cast(ts))
            else:
                arrays.append(pa.array(cols[f.name], f.type))
        sent = True
        yield pa.RecordBatch.from_arrays(arrays, schema=schema)
    if not sent:
        yield pa.RecordBatch.from_pylist([], schema=schema)
    if missing:
        import warnings

        warnings.warn(f"{missing:,} succeeded task(s) have lost their result file under"
                      f" {base / 'results'}; their rows have no result and say so in 'error'",
                      stacklevel=2)


def write_stream(batches: Iterable[Any], fmt: str, dest: IO[bytes]) -> int:
    """Write record ``batches`` (one schema) to the open binary file ``dest``, one batch at a
    time, in format ``fmt`` (:data:`FORMATS`); return the number of rows."""
    import pyarrow as pa

    rows = 0
    writer: Any = None
    first = True
    if fmt == "json":
        dest.write(b"[")
    for batch in batches:
        rows += batch.num_rows
        if fmt in ("json", "jsonl"):
            for line in json_lines(batch):
                if fmt == "json":
                    dest.write((("\n" if first else ",\n") + line.rstrip("\n")).encode())
                else:
                    dest.write(line.encode())
                first = False
            continue
        table = export_table(pa.Table.from_batches([batch]), fmt)
        if writer is None:
            if fmt == "parquet":
                import pyarrow.parquet as pq

                writer = pq.ParquetWriter(dest, table.schema)
            else:
                import pyarrow.csv as pcsv

                writer = pcsv.CSVWriter(dest, table.schema)
        writer.write_table(table)
    if writer is not None:
        writer.close()
    if fmt == "json":
        dest.write(b"\n]\n" if not first else b"]\n")
    return rows


def replace_file(path: str | os.PathLike[str], fill: Callable[[IO[bytes]], None]) -> None:
    """Write a file through ``fill`` so that it appears whole or not at all.

    ``fill`` writes into a temporary file in the target's directory, which is then renamed
    over the target; on any error the temporary file is removed and the target is left as it
    was. A target that exists and is not a regular file (a pipe, ``/dev/stdout``) is written
    in place: there is nothing there to keep.
    """
    real = Path(os.path.realpath(path))
    try:
        st: os.stat_result | None = os.stat(real)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        with open(real, "wb") as f:
            fill(f)
        return
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=real.parent, prefix=f".{real.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        if st is not None:  # the replaced file's permissions, else what a new file would get
            mode = stat.S_IMODE(st.st_mode)
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, real)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise

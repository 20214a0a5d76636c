"""One task in full (``pipefarm show``): what it runs, the row it came from, every attempt,
and where its output is. Reads only."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from ..states import State
from ..store.sqlite.query import CatalogQuery
from ..task import signal_label

#: characters of an argument's repr shown: enough to recognise a value, while a task that
#: received a large array does not flood the terminal
ARG_REPR_MAX = 200


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="milliseconds")


def _short(text: str, limit: int = ARG_REPR_MAX) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def signal_name(exit_code: int | None) -> str | None:
    """``SIGKILL`` for an exit code of -9 (a process killed by a signal), else None."""
    if exit_code is None or exit_code >= 0:
        return None
    return signal_label(-exit_code)


def output_location(run_dir: Path, ref: str | None) -> dict[str, Any] | None:
    """Where an attempt's stdout and stderr are: file paths and ``[offset, length]`` extents
    (shared per-worker logs), or whole per-task files; None when it printed nothing."""
    if not ref:
        return None
    from ..execute.output import LOG_DIRNAME, SUFFIXES, TASKS_DIRNAME

    try:
        first, second, name = ref[1:].split("/", 2)
        out: dict[str, Any] = {}
        for stream, spec, suffix in (("stdout", first, SUFFIXES[0]), ("stderr", second, SUFFIXES[1])):
            if ref[0] == "s":
                if not spec:
                    continue
                extents = [[int(o), int(n)] for o, _, n in (x.partition("+") for x in spec.split(","))]
                out[stream] = {"file": str(run_dir / LOG_DIRNAME / (name + suffix)),
                               "extents": extents, "bytes": sum(n for _, n in extents)}
            elif ref[0] == "t":
                if int(spec or 0):
                    out[stream] = {"file": str(run_dir / LOG_DIRNAME / TASKS_DIRNAME / (name + suffix)),
                                   "bytes": int(spec)}
        return out or None
    except ValueError:
        return {"reference": ref}


def _what(run: Any, q: CatalogQuery, spec_id: int, args: bytes | None) -> dict[str, Any]:
    """The command (rendered, with its source row) or the function and its arguments."""
    spec = q.spec(spec_id)
    if spec.kind == "cmd":
        from ..execute.template import decode_command, decode_values, render_cwd
        from .export import command_text

        cmd = decode_command(spec.payload)
        values = decode_values(args)
        return {"kind": "command", "command": command_text(cmd, values),
                "cwd": render_cwd(cmd, values) if cmd.cwd else None,
                "source_row": values, "retries": spec.max_attempts - 1,
                "timeout_s": spec.timeout}
    from ..task import loads_args

    try:
        pos, kw = loads_args(args)
        shown = {"args": [_short(repr(a)) for a in pos],
                 "kwargs": {k: _short(repr(v)) for k, v in kw.items()}}
    except Exception as exc:  # noqa: BLE001 - its module may not import here: say so
        shown = {"args": None, "kwargs": None,
                 "args_error": f"cannot load the arguments here: {type(exc).__name__}: {exc}"}
    return {"kind": "python", "function": spec.name, **shown,
            "retries": spec.max_attempts - 1, "timeout_s": spec.timeout}


def show_task(run: Any, task: int) -> dict[str, Any]:
    """Everything about one task as a JSON-ready dict; ``KeyError`` if there is no such task."""
    with CatalogQuery.open(run.path) as q:
        return _show(run, q, task)


def _show(run: Any, q: CatalogQuery, task: int) -> dict[str, Any]:
    row = q.task_detail(task)
    deps = q.deps_of(task)
    outputs = q.attempt_outputs(task)
    attempts = []
    for a in q.attempts(task):
        ref = row["output"] if a.attempt == row["attempt"] else outputs.get(a.attempt)
        lines = (a.error or "").strip().splitlines()
        if lines and lines[0].startswith("Traceback"):
            lines = lines[-1:]  # a Python traceback says what happened on its last line
        attempts.append({
            "attempt": a.attempt, "worker": a.worker, "outcome": a.outcome,
            "started_at": _iso(a.started_at), "ended_at": _iso(a.ended_at),
            "duration_s": (round(a.ended_at - a.started_at, 3)
                           if a.started_at is not None and a.ended_at is not None else None),
            "exit_code": a.exit_code, "signal": signal_name(a.exit_code),
            "error": lines[0] if lines else None, "note": a.note,
            "output": output_location(Path(run.path), ref), "peak_memory": a.peak_memory,
        })
    state = State(row["state"]).label
    error = row["error"]
    if error is None and state == "skipped":
        error = "a task it depends on did not succeed"
    return {
        "run": str(run.path), "task_id": task, "key": row["key"], "state": state,
        **_what(run, q, row["spec"], row["args"]),
        "after": deps, "priority": row["priority"],
        "error": error, "attempts": attempts,
        "logs": f"pipefarm logs {run.path} {task}" if any(x["output"] for x in attempts) else None,
    }


def render_text(info: dict[str, Any]) -> str:
    """``show_task``'s dict as lines for a terminal."""
    out = [f"task {info['task_id']} of {info['run']}: {info['state']}"
           + (f"  (key {info['key']})" if info["key"] is not None else "")]
    if info["kind"] == "command":
        out.append(f"  command:  {info['command']}")
        if info["cwd"]:
            out.append(f"  cwd:      {info['cwd']}")
        if info["source_row"]:
            out.append("  source row: " + ", ".join(f"{k}={v}" for k, v in info["source_row"].items()))
    else:
        out.append(f"  function: {info['function']}")
        if info.get("args_error"):
            out.append(f"  arguments: {info['args_error']}")
        else:
            args = [*info["args"], *(f"{k}={v}" for k, v in info["kwargs"].items())]
            out.append(f"  arguments: ({', '.join(args)})")
    if info["after"]:
        out.append("  after:    " + ", ".join(map(str, info["after"])))
    if info["error"]:
        out.append(f"  error:    {info['error'].strip().splitlines()[-1]}")
    if not info["attempts"]:
        out.append("  no attempt yet")
    for a in info["attempts"]:
        code = ("" if a["exit_code"] is None else f", exit {a['exit_code']}"
                + (f" ({a['signal']})" if a["signal"] else ""))
        out.append(f"  attempt {a['attempt']}: {a['outcome']}{code} on {a['worker'] or '-'},"
                   f" {a['started_at'] or '-'} .. {a['ended_at'] or '-'}"
                   + (f" ({a['duration_s']:.3f} s)" if a["duration_s"] is not None else "")
                   + (f", peak {a['peak_memory'] / 2**20:.1f} MiB" if a.get("peak_memory") else ""))
        if a["error"]:
            out.append(f"    error: {a['error']}")
        if a["note"]:
            out.append(f"    note: {a['note']}")
        for stream, where in (a["output"] or {}).items():
            if stream == "reference":
                out.append(f"    output: {where}")
                continue
            ext = ("" if "extents" not in where else
                   " at " + ", ".join(f"{o}+{n}" for o, n in where["extents"]))
            out.append(f"    {stream}: {where['file']}{ext} ({where['bytes']:,} bytes)")
    if info["logs"]:
        out.append(f"  read it: {info['logs']} [--attempt N] [--stderr]")
    return "\n".join(out)

"""The verbs that only read runs: ``status``, ``results``, ``logs``, ``failures``, ``list``,
``show``.

None of them changes a run. Each opens its run read-only through
:func:`~pipefarm.cli.app._open`, which warns on a directory others can write and refuses one
only where the verb would unpickle from it (``list`` opens the runs it finds itself). The
numbers come from ``pipefarm.observe`` and ``execute.output``; this module only prints them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..states import UNSUCCESSFUL_END, left_count
from .app import _open, main


# --- status ----------------------------------------------------------------------------------------
@main.command()
@click.argument("run_dir", metavar="RUN")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(run_dir: str, as_json: bool) -> None:
    """Counts by state, throughput, ETA and the latest failures.

    \b
      pipefarm status runs/sweep
      pipefarm status runs/sweep --json | jq .counts
    An ETA shows only while the run is being worked on (a live `pipefarm run`, or array
    workers with fresh heartbeats), from the last minute's completion rate and how long the
    running tasks have run; a stopped run says how to resume instead. Only reads the run.
    Exit status: 0 whenever the status could be read, whatever the tasks' states (use
    --json's counts, or `pipefarm run`'s exit status, to test for failures); 2 on a usage
    error such as a missing run.
    """
    from ..backends.array import sync
    from ..observe.status import status_report

    run = _open(run_dir)
    sync(run)  # a shared-filesystem run: fold what the workers journaled
    rep = status_report(run)
    if as_json:
        click.echo(json.dumps(rep, indent=2))
        return
    c = rep["counts"]
    click.echo(f"{rep['run']}: {rep['total']:,} tasks, {rep['done']:,} done")
    click.echo("  " + "  ".join(f"{k} {v:,}" for k, v in c.items() if v))
    if rep.get("cached"):
        click.echo(f"  cached: {rep['cached']:,} of the succeeded tasks came from the result cache")
    if rep.get("backends"):
        click.echo("  executed on: " + ", ".join(rep["backends"]))
    left = rep["total"] - rep["done"]
    if rep["live"]:
        eta = f", eta {rep['eta_s']:,.0f} s" if rep["eta_s"] is not None else ", eta -"
        click.echo(f"  running: {rep['throughput_per_s']:,.2f} tasks/s (last minute){eta}")
    elif left:
        click.echo(f"  not running: {left:,} task(s) left; resume with: pipefarm run {run_dir}")
    if rep.get("waiting_for_time"):
        click.echo(f"  waiting for a worker with more time: {rep['waiting_for_time']:,} task(s)"
                   f" asked for more (--time-request) than the {rep['longest_time_left_s']:,.0f} s"
                   " the live array workers have left")
    if rep["last_failures"]:
        click.echo("  latest failures:")
        for f in rep["last_failures"]:
            click.echo(f"    task {f['task_id']}: {f['error'] or '(no message)'}")
    if rep["last_notes"]:
        click.echo("  latest notes:")
        for n in rep["last_notes"]:
            click.echo(f"    task {n['task_id']}: {n['note']}")



# --- results ---------------------------------------------------------------------------------------
def _results_format(fmt: str | None, output: str | None) -> str:
    """The export format: given, else from -o's suffix (.jsonl/.ndjson: jsonl), else csv."""
    if fmt is not None:
        return fmt
    suffix = Path(output).suffix.lower().lstrip(".") if output and output != "-" else ""
    if suffix == "ndjson":
        return "jsonl"
    return suffix if suffix in ("parquet", "csv", "json", "jsonl") else "csv"


@main.command()
@click.argument("run_dir", metavar="RUN")
@click.option("--format", "fmt", type=click.Choice(["parquet", "csv", "json", "jsonl"]), default=None, help="json: one JSON array; jsonl: one object per line. Default: from -o's suffix, else csv.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True), help="File to write; - or none: stdout.")
def results(run_dir: str, fmt: str | None, output: str | None) -> None:
    """One row per task, joinable to the rows it came from.

    \b
      pipefarm results runs/sweep -o results.parquet
      pipefarm results runs/sweep --format csv > results.csv
      pipefarm results runs/sweep --format jsonl -o - | jq .param_alpha
    \b
    Columns: task_id, key, state, attempts, exit_code, result, error, started_at, ended_at
    (UTC timestamps), duration_s, worker, peak_memory (resident bytes at the last attempt's
    peak), command (as run, rendered), stdout_tail (the last 1 KiB of stdout; all of it:
    pipefarm logs RUN ID), then param_NAME for each placeholder
    value of the source row (--from-csv: one per CSV column, as text).
    Results that are not one plain type (mixed, or objects) are JSON text, and a value JSON
    cannot encode shows as <not JSON-encodable: TYPE>: read it with Run.open(RUN).result(ID).
    In CSV, dicts and lists are JSON text too. The export streams: memory stays flat however
    large the run. -o FILE is replaced only once the new file is complete: a failed export
    leaves it as it was.
    """
    fmt = _results_format(fmt, output)
    to_stdout = output is None or output == "-"
    if fmt == "parquet" and to_stdout and sys.stdout.isatty():
        raise click.UsageError("parquet is binary: give -o FILE or redirect stdout")
    import pyarrow as pa

    from ..backends.array import sync
    from ..observe.export import replace_file, result_batches, write_stream

    run = _open(run_dir)
    sync(run)
    if to_stdout:
        write_stream(result_batches(run), fmt, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return
    assert output is not None
    existed = Path(output).exists()
    written: list[int] = []
    try:
        replace_file(output, lambda f: written.append(write_stream(result_batches(run), fmt, f)))
    except (OSError, pa.ArrowException) as exc:
        why = (getattr(exc, "strerror", None) or str(exc)).strip().splitlines()[0]
        kept = f"{output} was left as it was" if existed else "nothing was written"
        raise click.ClickException(f"cannot write {output}: {why}; {kept}") from None
    click.echo(f"wrote {sum(written):,} rows to {output}", err=True)


# --- logs ------------------------------------------------------------------------------------------
@main.command()
@click.argument("run_dir", metavar="RUN")
@click.argument("task", type=int)
@click.option("--attempt", type=int, help="Which attempt (default: the latest).")
@click.option("--stderr", "want_stderr", is_flag=True, help="Show stderr instead of stdout.")
@click.option("--follow", "-f", is_flag=True, help="Show the output as it comes while the task runs, like tail -f (pipefarm logs runs/sweep 42 -f); ends when its attempt ends, Ctrl-C ends it quietly.")
def logs(run_dir: str, task: int, attempt: int | None, want_stderr: bool, follow: bool) -> None:
    """What one attempt of TASK printed, exactly (command and Python tasks alike).

    \b
      pipefarm logs runs/sweep 42
      pipefarm logs runs/sweep 42 --attempt 1 --stderr
      pipefarm logs runs/sweep 42 --follow      # while `pipefarm run` runs it
    With --follow a task not started yet is waited for.
    """
    from ..execute.output import OutputUnavailable

    run = _open(run_dir)
    rows = run.tasks(ids=[task])
    if not rows:
        raise click.UsageError(f"no task {task} in {run_dir}")
    made = rows[0].attempts
    if attempt is not None and not 1 <= attempt <= made:
        have = f"attempts 1-{made}" if made > 1 else "attempt 1" if made else "no attempt yet"
        raise click.UsageError(f"task {task} has {have}; there is no attempt {attempt}")
    if follow and attempt is not None:
        raise click.UsageError("--follow shows the running attempt: leave out --attempt")
    stream = "stderr" if want_stderr else "stdout"
    try:
        if not follow:
            _write(run.output(task, attempt, stream))
            return
        try:
            run.follow_output(task, stream, _write)
        except KeyboardInterrupt:
            pass  # Ctrl-C ends following; the task runs on
    except OutputUnavailable as exc:
        raise click.ClickException(f"task {task}'s output cannot be read: {exc}") from None


def _write(data: bytes) -> None:
    """Bytes to stdout as they come, byte-exact."""
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()



# --- failures --------------------------------------------------------------------------------------
@main.command()
@click.argument("run_dir", metavar="RUN")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--top", type=int, default=20, show_default=True, help="Groups to show.")
def failures(run_dir: str, as_json: bool, top: int) -> None:
    """Failed tasks grouped by error signature, biggest group first.

    \b
      pipefarm failures runs/sweep
    The signature is the exit code and the last stderr line (or the exception type and
    message) with numbers, paths and quoted values blanked out.
    """
    from ..observe.failures import failures as groups_of

    groups = groups_of(_open(run_dir))
    if as_json:
        import msgspec

        click.echo(msgspec.json.encode(groups[:top]).decode())
        return
    if not groups:
        click.echo("no failed tasks")
        return
    total = sum(g.count for g in groups)
    click.echo(f"{total:,} failed task(s) in {len(groups)} group(s):")
    for g in groups[:top]:
        click.echo(f"\n{g.count:>8,}  {g.signature}")
        example = g.example_error.strip().splitlines()
        click.echo(f"          e.g. task {g.example_task}: " + (example[-1] if example else ""))
        more = ", ".join(map(str, g.task_ids[:10]))
        click.echo(f"          tasks: {more}{' ...' if g.count > 10 else ''}")



# --- list / show -------------------------------------------------------------------------------------
@main.command("list")
@click.argument("top", metavar="[DIR]", default=".", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output: a JSON array.")
def list_cmd(top: str, as_json: bool) -> None:
    """The runs under DIR (default: here), with counts and where each stands.

    \b
      pipefarm list runs
      pipefarm list --json | jq '.[] | select(.state == "interrupted-resumable") | .run'
    \b
    Searches four levels deep and never inside a run. State: running (a live `pipefarm run`
    or array workers), interrupted-resumable (stopped with tasks left: `pipefarm run RUN`),
    pending (submitted, never started), failed (ended, some tasks did not succeed), finished
    (every task succeeded), empty, unreadable (the reason in its error). Only reads the runs.
    """
    from ..observe.runs import list_runs

    if not Path(top).is_dir():
        raise click.UsageError(f"{top} is not a directory")
    rows = list_runs(top)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no runs under {top}")
        return
    width = max(len(r["run"]) for r in rows)
    click.echo(f"{'RUN':<{width}}  {'STATE':<21}  {'TASKS':>8}  {'OK':>8}  {'FAILED':>8}  {'LEFT':>8}")
    for r in rows:
        c = r["counts"]
        if r["state"] == "unreadable":
            click.echo(f"{r['run']:<{width}}  {'unreadable':<21}  {r['error']}")
            continue
        left = left_count(c)
        bad = sum(c[s.label] for s in UNSUCCESSFUL_END)
        click.echo(f"{r['run']:<{width}}  {r['state']:<21}  {r['total']:>8,}  {c['succeeded']:>8,}"
                   f"  {bad:>8,}  {left:>8,}" + (f"  unsafe: {r['unsafe']}" if "unsafe" in r else ""))


@main.command()
@click.argument("run_dir", metavar="RUN")
@click.argument("task", type=int)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(run_dir: str, task: int, as_json: bool) -> None:
    """One task in full: what it runs, its source row, every attempt, where its output is.

    \b
      pipefarm show runs/sweep 42
      pipefarm show runs/sweep 42 --json | jq '.attempts[-1].exit_code'
    \b
    A command task shows the command as run (placeholders filled) and the source row's
    values; a Python task its function and arguments (repr, cut at 200 characters). Each
    attempt: worker, times (UTC), outcome, exit code or signal, first line of its error, and
    the log files and byte ranges its stdout/stderr occupy. Only reads the run.
    """
    from ..backends.array import sync
    from ..observe.show import render_text, show_task

    run = _open(run_dir)
    sync(run)
    try:
        info = show_task(run, task)
    except KeyError:
        raise click.UsageError(f"no task {task} in {run_dir}") from None
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(render_text(info))

"""The ``pipefarm`` command line.

Every verb's ``--help`` has an example. User mistakes print one line on stderr and exit 2;
``pipefarm run`` exits 0 when every task succeeded and 1 when some did not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

EXIT_FAILED_TASKS = 1
EXIT_USAGE = 2


def _die(msg: str, code: int = EXIT_USAGE) -> None:
    click.echo(f"pipefarm: error: {msg}", err=True)
    sys.exit(code)


def _damaged(exc: Any) -> None:
    """A damaged catalog: what and where on one line, how to recover on a second."""
    click.echo(f"pipefarm: error: {exc.args[0]}", err=True)
    click.echo(f"pipefarm: hint: {exc.hint}", err=True)
    sys.exit(EXIT_USAGE)


#: the run directory the last ``_open`` opened: a damaged page found by a later query is
#: reported against its catalog
_opened: Path | None = None

#: verbs that only read a run: on a directory others can write they warn and go on, as long
#: as they unpickle nothing (``results`` decodes Python results, so it refuses when there are)
_READING_VERBS = frozenset({"status", "results", "failures", "logs", "list", "show"})


def _holds_pickles(run: Any, verb: str) -> bool:
    """Whether ``verb`` would unpickle something from ``run``: ``results`` the results of
    succeeded tasks, ``show`` the arguments of Python tasks."""
    from .states import State
    from .task import PY

    if verb == "show":
        query, args = "SELECT 1 FROM specs WHERE kind=? LIMIT 1", (PY,)
    else:
        query = ("SELECT 1 FROM tasks WHERE state=? AND (result IS NOT NULL"
                 " OR result_file IS NOT NULL) LIMIT 1")
        args = (int(State.SUCCEEDED),)
    return run.store.db.execute(query, args).fetchone() is not None


def _open(path: str) -> Any:
    """Open RUN for the verb being run: writing verbs refuse a directory others can write,
    reading verbs warn and proceed unless they would unpickle from it."""
    global _opened
    from .run import Run

    ctx = click.get_current_context(silent=True)
    verb = ctx.info_name if ctx is not None else None
    _opened = Path(path)
    if verb not in _READING_VERBS:
        return Run.open(path)
    import warnings

    with warnings.catch_warnings(record=True) as said:  # said once we know we go on
        warnings.simplefilter("always")
        run = Run.open(path, readonly=True)
    if run.unsafe and verb in ("results", "show") and _holds_pickles(run, verb):
        from .errors import UnsafeRun

        what = "results" if verb == "results" else "task arguments"
        run.close()
        raise UnsafeRun(f"{path} can be written by other users and holds Python {what}, "
                        f"which `pipefarm {verb}` would unpickle. Fix with: chmod go-w {path}")
    for w in said:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return run


def _ids(text: str | None) -> list[int] | None:
    """``"1,5,10-20"`` -> ids; an empty list, a reversed range or a non-id is a usage error."""
    if text is None:
        return None
    out: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if lo > hi:
                    raise click.BadParameter(
                        f"{part!r} is an empty range: write it low-high, e.g. {hi}-{lo}")
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise click.BadParameter(f"{part!r} is not an id or a range like 10-20") from None
    if not out:
        raise click.BadParameter(f"{text!r} names no task ids; give ids or ranges like 7,12-20")
    return out


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
        from .errors import SubmissionError
        from .run import checked_timeout

        try:
            return checked_timeout(value)
        except SubmissionError:
            self.fail(f"{value!r} is not a number of seconds > 0 (inf: no timeout)", param, ctx)


def _warning_line(message: Warning | str, category: type[Warning], *args: Any, **kw: Any) -> str:
    return f"pipefarm: warning: {message}\n"


class _Main(click.Group):
    """Turns expected errors into one line and exit status 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        import sqlite3
        import warnings

        from .errors import CatalogDamaged, PipefarmError

        kwargs["standalone_mode"] = False
        warnings.formatwarning = _warning_line  # one line, as the errors are
        try:
            rv = super().main(*args, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort:
            _die("aborted", 130)
        except click.UsageError as exc:
            cmd = exc.ctx.command_path if exc.ctx else "pipefarm"
            _die(f"{exc.format_message()} (see: {cmd} --help)")
        except click.ClickException as exc:
            _die(exc.format_message())
        except CatalogDamaged as exc:
            _damaged(exc)
        except (PipefarmError, FileNotFoundError, FileExistsError, NotADirectoryError,
                PermissionError) as exc:
            _die(str(exc))
        except sqlite3.DatabaseError as exc:  # damage found past the open, by a query
            from .store.sqlite import _is_damage

            if not _is_damage(exc):
                raise
            if _opened is None:  # a verb that opens runs itself (list): which one is unknown
                _die(f"a run's catalog is damaged ({exc}); nothing was changed. `pipefarm"
                     " status RUN` on each run says which, and how to recover it")
            _damaged(CatalogDamaged(str(_opened / "catalog.db"), str(exc)))
        except KeyError as exc:  # TemplateError and unknown ids
            _die(str(exc.args[0]) if exc.args else str(exc))
        except UnicodeEncodeError:
            # argv arrives surrogate-escaped: bytes that are not UTF-8 reached text storage
            from .execute.cmd import has_surrogates

            bad = [a for a in sys.argv[1:] if has_surrogates(a)]
            if not bad:
                raise
            _die(f"argument {_shown(bad[0])} is not valid UTF-8")
        except BrokenPipeError:
            sys.exit(0)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="pipefarm")
def main() -> None:
    """Run large numbers of tasks in parallel, durably.

    \b
    A sweep over a CSV file, in four commands:
      pipefarm submit runs/sweep --from-csv params.csv -- ./simulate --alpha {alpha} --beta {beta}
      pipefarm run runs/sweep --workers 8
      pipefarm status runs/sweep
      pipefarm results runs/sweep --format parquet -o results.parquet

    Every result is on disk as soon as its task ends: stop at any time (Ctrl-C, a crash, a
    walltime kill) and `pipefarm run` again resumes what is left.
    """


# --- submit ----------------------------------------------------------------------------------------
@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("run_dir", metavar="RUN")
@click.argument("command", nargs=-1, required=True, metavar="-- CMD [ARG]...")
@click.option("--array", "array_spec", metavar="RANGE", help="One task per index: 0-9999, 0-99:2 or 1,5,7. Placeholder {index}.")
@click.option("--from-file", "from_file", type=click.Path(dir_okay=False), help="One task per line: {line}, and {0} {1} ... for its whitespace-separated fields.")
@click.option("--from-csv", "from_csv", type=click.Path(dir_okay=False), help="One task per row; the header names the placeholders: {alpha}.")
@click.option("--from-json", "from_json", type=click.Path(dir_okay=False), help="A JSON list of objects (or JSON lines); keys name the placeholders.")
@click.option("--shell", is_flag=True, help="Run CMD as one /bin/sh line; substituted values are quoted.")
@click.option("--retries", type=click.IntRange(min=0), default=0, show_default=True, help="Extra attempts after a failure or timeout.")
@click.option("--timeout", type=_Seconds(), help="Seconds per attempt (> 0; inf: none); the whole process group is killed past it.")
@click.option("--priority", type=int, default=0, show_default=True, help="Higher runs first.")
@click.option("--cost", type=float, help="Expected cost; higher runs first among equal priority.")
@click.option("--cpus", type=click.IntRange(min=1), default=1, show_default=True, help="Worker slots each task takes.")
@click.option("--gpus", type=click.IntRange(min=0), default=0, show_default=True, help="GPUs of its own each task gets (CUDA_VISIBLE_DEVICES).")
@click.option("--after", metavar="ID,...", help="Task ids (or ranges 1-100) that must succeed first.")
@click.option("--tag", "tags", multiple=True, help="A label (repeatable).")
@click.option("--cwd", help="Working directory (may hold placeholders).")
@click.option("--env", "env", multiple=True, metavar="K=V", help="Environment variable for the tasks (repeatable).")
@click.option("--key", "key_template", metavar="TEMPLATE", help="A name per task from the placeholders, e.g. 'a{alpha}-b{beta}'.")
@click.option("--output-cap", type=click.IntRange(min=0), default=1 << 20, show_default=True, help="Bytes of stdout and of stderr kept per attempt.")
@click.option("--output-per-task", is_flag=True, help="One log file per attempt instead of a few per worker.")
def submit(run_dir: str, command: tuple[str, ...], array_spec: str | None, from_file: str | None,
           from_csv: str | None, from_json: str | None, shell: bool, retries: int,
           timeout: float | None, priority: int, cost: float | None, cpus: int, gpus: int,
           after: str | None, tags: tuple[str, ...], cwd: str | None, env: tuple[str, ...],
           key_template: str | None, output_cap: int, output_per_task: bool) -> None:
    """Add command tasks to RUN (created if needed).

    \b
    Placeholders in CMD are filled per task from one source:
      pipefarm submit runs/a --array 0-9999 -- ./sim --seed {index}
      pipefarm submit runs/b --from-file inputs.txt -- gzip -k {line}
      pipefarm submit runs/c --from-csv params.csv --retries 2 --timeout 600 -- ./sim {alpha} {beta}
      pipefarm submit runs/d --shell --from-file names.txt -- 'grep -c x {line} > {line}.count'
    \b
    As GNU parallel: values after ::: (or one per line of the files after ::::); several
    groups make every combination, named {1} {2} ...; {} is the value of a single source:
      pipefarm submit runs/e -- gzip -k {} ::: a.txt b.txt c.txt
      pipefarm submit runs/f -- ./sim --alpha {1} --beta {2} ::: 0.1 0.2 ::: 1 2 3
      pipefarm submit runs/g -- gzip -k {} :::: inputs.txt
      pipefarm submit runs/h --array 1-100 -- ./sim --seed {}
    Without any placeholder, the ::: values are appended to CMD, as GNU parallel does.
    Values are passed as separate arguments (no shell, no injection); with --shell they are
    quoted. Only {name}, {name:spec}, {N} and {} are placeholders: other braces are plain
    text, and ${VAR} is the shell's, so shell and awk need no escaping ({{ and }} are one
    literal brace):
      pipefarm submit runs/i --from-file inputs.txt -- awk '{print $1}' {line}
    A placeholder with no source column is refused before anything is written, and a refused
    submission leaves no new RUN behind. With --key, a task whose key is already in RUN is
    not added again: submitting the same sweep twice adds only what is new. From 1,000,000
    tasks (--array, :::) it first says how much disk the catalog will take; set the bound
    with e.g. PIPEFARM_LARGE_SUBMISSION=100000.
    """
    import itertools

    from . import sources
    from .execute.cmd import Command, name_default, placeholders, render
    from .run import Run

    try:
        words, groups = sources.split_inline_args(command)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if not words:
        raise click.UsageError(f"no command before {command[0]!r}")
    chosen = [s for s in (array_spec, from_file, from_csv, from_json, groups) if s is not None]
    if len(chosen) > 1:
        raise click.UsageError(
            "choose at most one of --array, --from-file, --from-csv, --from-json, :::/::::")
    _refuse_undecodable(words, "CMD")
    _refuse_undecodable([run_dir, cwd, key_template, *env, *tags], "")
    env_map = {}
    for item in env:
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not K=V", param_hint="--env")
        k, v = item.split("=", 1)
        env_map[k] = v
    if groups is not None and not any(
            placeholders(Command(argv=[w])) for w in [*words, *([cwd] if cwd else [])]):
        # GNU parallel appends the values to a command that names none of them
        words += ["{}"] if len(groups) == 1 else [f"{{{i}}}" for i in range(1, len(groups) + 1)]
    if shell:
        cmd = Command(shell=" ".join(words), cwd=cwd, env=env_map, output_cap=output_cap,
                      output_per_task=output_per_task)
    else:
        cmd = Command(argv=list(words), cwd=cwd, env=env_map, output_cap=output_cap,
                      output_per_task=output_per_task)
    key_cmd = Command(argv=[key_template]) if key_template is not None else None
    rows: Any = None
    size: int | None = None  # known before reading: for the large-submission note
    value_bytes = 0.0
    only: str | None = None  # the column {} stands for
    try:
        if array_spec is not None:
            rows, only = sources.array_source(array_spec), "index"
            size = sources.array_size(array_spec)
            value_bytes = max(len(d) for d in array_spec.replace("-", ",").split(","))
        elif from_file is not None:
            rows, only = sources.file_source(from_file), "line"
        elif groups is not None:
            rows, size = sources.inline_source(groups), sources.inline_size(groups)
            only = "1" if len(groups) == 1 else None
            value_bytes = sum(sum(map(len, g)) / len(g) for g in groups)
        elif from_csv is not None or from_json is not None:
            rows = (sources.csv_source(from_csv) if from_csv is not None
                    else sources.json_source(from_json))  # type: ignore[arg-type]
            first = next(rows, None)  # a one-column source: {} is that column
            if first is not None:
                only = next(iter(first)) if len(first) == 1 else None
                rows = itertools.chain([first], rows)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if only is not None:
        cmd = name_default(cmd, only)
        key_cmd = name_default(key_cmd, only) if key_cmd is not None else None
    keys = None
    if key_cmd is not None:
        try:
            rows = list(rows) if rows is not None else [{}]
        except ValueError as exc:  # a malformed source row: nothing is written yet
            raise click.UsageError(str(exc)) from None
        keys = [render(key_cmd, r)[0] for r in rows]
    run = Run.create(run_dir, exist_ok=True)
    try:
        if size is not None:  # after create: a Ctrl-C once it is said is undone in full
            _note_large(size, value_bytes, run_dir)
        ids = run.submit_cmd(cmd, rows, keys=keys, retries=retries, timeout=timeout,
                             priority=priority, cost=cost, after=_ids(after), cpus=cpus,
                             gpus=gpus, tags=tags)
    except BaseException:  # refused, or Ctrl-C: the transaction rolled back
        _undo_create(run)
        raise
    added = getattr(ids, "added", ids)  # a TaskIds list when some keys were there already
    there = len(ids) - len(added)
    if not added:
        click.echo(f"no new tasks: all {there:,} keys are in {run_dir} already")
        return
    span = f"{added[0]}" if len(added) == 1 else f"{added[0]}-{added[-1]}"
    click.echo(f"added task{'s' if len(added) > 1 else ''} {span} ({len(added):,}) to {run_dir}"
               + (f"; {there:,} already there (same key)" if there else ""))


def _refuse_undecodable(args: list[str | None], what: str) -> None:
    """Refuse arguments that are not UTF-8 (argv arrives surrogate-escaped): templates and
    paths are stored as text. Values after ::: are not checked: they reach CMD byte-exact."""
    from .execute.cmd import has_surrogates

    for arg in args:
        if arg is not None and has_surrogates(arg):
            hint = ("; give such bytes as values (after ::: or in a --from-file), which reach "
                    "the command byte-exact") if what == "CMD" else ""
            _die(f"{what + ' ' if what else ''}argument {_shown(arg)} is not valid UTF-8{hint}")


def _shown(arg: str) -> str:
    """An argument as a printable literal: undecodable bytes as \\xNN."""
    return repr(arg.encode("utf-8", "surrogateescape"))[1:]


def _note_large(size: int, value_bytes: float, run_dir: str) -> None:
    """One line on stderr before a large submission is written: how many tasks, how much disk."""
    import os

    from .sources import LARGE_SUBMISSION, catalog_estimate

    try:
        threshold = int(os.environ.get("PIPEFARM_LARGE_SUBMISSION", LARGE_SUBMISSION))
    except ValueError:
        threshold = LARGE_SUBMISSION
    if size < threshold:
        return
    est = catalog_estimate(size, value_bytes)
    click.echo(f"pipefarm: note: submitting {size:,} tasks; the catalog in {run_dir} will take"
               f" about {_human_bytes(est)} of disk (Ctrl-C now writes nothing)", err=True)


def _human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"


def _undo_create(run: Any) -> None:
    """After a refused first submission: remove the run directory this submission made (and
    only that), so a typo leaves nothing behind. A run that holds tasks is never removed."""
    created = run.created
    try:
        empty = created is not None and not any(run.store.counts().values())
    except Exception:  # cannot tell: keep it
        empty = False
    run.close()
    if empty:
        import shutil

        shutil.rmtree(created, ignore_errors=True)


# --- run -------------------------------------------------------------------------------------------
#: ``pipefarm run`` stopped by SIGTERM (scheduler cancel, ``kill``): 128 + 15, as a shell reports it
EXIT_SIGTERM = 143
#: ``pipefarm run`` stopped by Ctrl-C (SIGINT): 128 + 2
EXIT_SIGINT = 130
#: ``pipefarm run --halt`` stopped early because tasks failed
EXIT_HALTED = 3


def _halt_spec(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    from .backends.local import HaltPolicy

    try:
        HaltPolicy.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc).removeprefix(f"--halt {value!r}: ")) from None
    return value


def _not_succeeded_lines(run_dir: str, counts: dict[str, int]) -> list[str]:
    """What the tasks that did not succeed are, each kind with where to look next."""
    lines = []
    if counts.get("failed"):
        lines.append(f"{counts['failed']:,} task(s) did not succeed; see: pipefarm failures"
                     f" {run_dir}")
    if counts.get("skipped"):
        lines.append(f"{counts['skipped']:,} task(s) skipped (a dependency did not succeed)")
    if counts.get("cancelled"):
        lines.append(f"{counts['cancelled']:,} task(s) cancelled (pipefarm cancel); run them with:"
                     f" pipefarm retry {run_dir} --all")
    left = sum(n for k, n in counts.items()
               if k not in ("succeeded", "failed", "skipped", "cancelled"))
    if left:
        lines.append(f"{left:,} task(s) not finished; resume with: pipefarm run {run_dir}")
    return lines


@main.command("run")
@click.argument("run_dir", metavar="RUN")
@click.option("--workers", "-w", type=click.IntRange(min=1), help="Worker processes (default: the CPU count).")
@click.option("--backend", type=click.Choice(["local", "sequential"]), default="local", show_default=True)
@click.option("--gpus-available", metavar="LIST", help="GPU ids to hand out, e.g. 0,1,2,3 (default: detected).")
@click.option("--halt", metavar="WHEN,fail=N", callback=_halt_spec, help="Stop early when tasks fail (as GNU parallel): soon,fail=3 hands out no new task after 3 failures, the running ones finish; now,fail=3 stops the running ones too (released, no retry spent); soon,fail=10% counts the share of ended tasks (from 10 ended on).")
@click.option("--no-progress", is_flag=True, help="No progress display.")
def run_cmd(run_dir: str, workers: int | None, backend: str, gpus_available: str | None,
            halt: str | None, no_progress: bool) -> int:
    """Execute RUN (or resume it): every task not finished yet.

    \b
      pipefarm run runs/sweep --workers 8
      pipefarm run runs/sweep --halt soon,fail=5     # stop handing out tasks after 5 failures
    Progress shows on a terminal as a bar, elsewhere as a line every 10 s. Ctrl-C stops
    cleanly; run it again to resume. Tasks that need more GPUs than there are stop it before
    anything runs (exit 2).
    Exit status: 0 all succeeded, 1 some did not, 3 halted by --halt, 130 Ctrl-C, 143 SIGTERM.
    """
    run = _open(run_dir)
    options: dict[str, Any] = {}
    if gpus_available is not None and backend == "local":
        from .execute.gpus import parse_device_list

        options["gpus_available"] = parse_device_list(gpus_available)
    if halt is not None:
        if backend != "local":
            raise click.UsageError("--halt works with --backend local")
        options["halt"] = halt
    try:
        summary = run.execute(workers=workers, backend=backend, progress=not no_progress, **options)
    except KeyboardInterrupt:
        click.echo(f"interrupted; resume with: pipefarm run {run_dir}", err=True)
        return EXIT_SIGINT
    click.echo(str(summary), err=True)
    if summary.interrupted:  # SIGTERM (Ctrl-C raises KeyboardInterrupt): nothing was charged
        click.echo(f"interrupted; resume with: pipefarm run {run_dir}", err=True)
        return EXIT_SIGTERM
    if summary.halted:
        click.echo(f"halted: {summary.halted}; see: pipefarm failures {run_dir}; the rest"
                   f" resume with: pipefarm run {run_dir}", err=True)
        return EXIT_HALTED
    if not summary.ok:
        for line in _not_succeeded_lines(run_dir, summary.counts):
            click.echo(line, err=True)
        return EXIT_FAILED_TASKS
    return 0


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
    from .backends.array import sync
    from .observe.status import status_report

    run = _open(run_dir)
    sync(run)  # a shared-filesystem run: fold what the workers journaled
    rep = status_report(run)
    if as_json:
        click.echo(json.dumps(rep, indent=2))
        return
    c = rep["counts"]
    click.echo(f"{rep['run']}: {rep['total']:,} tasks, {rep['done']:,} done")
    click.echo("  " + "  ".join(f"{k} {v:,}" for k, v in c.items() if v))
    left = rep["total"] - rep["done"]
    if rep["live"]:
        eta = f", eta {rep['eta_s']:,.0f} s" if rep["eta_s"] is not None else ", eta -"
        click.echo(f"  running: {rep['throughput_per_s']:,.2f} tasks/s (last minute){eta}")
    elif left:
        click.echo(f"  not running: {left:,} task(s) left; resume with: pipefarm run {run_dir}")
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
    (UTC timestamps), duration_s, worker, command (as run, rendered), stdout_tail (the last
    1 KiB of stdout; all of it: pipefarm logs RUN ID), then param_NAME for each placeholder
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

    from .backends.array import sync
    from .observe.results import replace_file, result_batches, write_stream

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
    from .execute.output import OutputUnavailable, follow_output, read_output

    run = _open(run_dir)
    rows = run.store.tasks(ids=[task])
    if not rows:
        raise click.UsageError(f"no task {task} in {run_dir}")
    made = rows[0].attempts
    if attempt is not None and not 1 <= attempt <= made:
        have = f"attempts 1-{made}" if made > 1 else "attempt 1" if made else "no attempt yet"
        raise click.UsageError(f"task {task} has {have}; there is no attempt {attempt}")
    stream = "stderr" if want_stderr else "stdout"
    if follow:
        if attempt is not None:
            raise click.UsageError("--follow shows the running attempt: leave out --attempt")

        def poll() -> tuple[str, str | None, int]:
            row = run.store.tasks(ids=[task])[0]
            return row.state, row.worker, row.attempts

        def write(data: bytes) -> None:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()

        try:
            follow_output(run.path, task, stream, poll,
                          lambda a: run.store.output_ref(task, a), write)
        except KeyboardInterrupt:
            pass  # Ctrl-C ends following; the task runs on
        except OutputUnavailable as exc:
            raise click.ClickException(f"task {task}'s output cannot be read: {exc}") from None
        return
    ref = run.store.output_ref(task, attempt)
    try:
        data = read_output(run.path, ref, stream)
    except OutputUnavailable as exc:
        raise click.ClickException(f"task {task}'s output cannot be read: {exc}") from None
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


# --- retry / cancel --------------------------------------------------------------------------------
@main.command()
@click.argument("run_dir", metavar="RUN")
@click.option("--failed", "failed_only", is_flag=True, default=False, help="Only failed tasks (the default without --ids).")
@click.option("--all", "everything", is_flag=True, help="Failed, cancelled and skipped tasks, e.g. after a cancel: pipefarm retry RUN --all.")
@click.option("--ids", metavar="ID,...", help="Exactly these tasks (ids or ranges 1-100).")
@click.option("--force", is_flag=True, help="With --ids: also run tasks that succeeded again (their result is replaced).")
def retry(run_dir: str, failed_only: bool, everything: bool, ids: str | None,
          force: bool) -> None:
    """Give ended tasks a new attempt budget; then `pipefarm run` again.

    \b
      pipefarm retry runs/sweep            # every failed task
      pipefarm retry runs/sweep --ids 7,12-20
      pipefarm retry runs/sweep --ids 7 --force   # 7 succeeded: run it again anyway
      pipefarm retry runs/sweep --all             # cancelled and skipped tasks too
    Tasks that succeeded are run again only with --force; their earlier attempts stay in the
    history (pipefarm logs RUN ID --attempt N). --ids, --failed and --all choose the tasks in
    different ways: give one. An id that is not in RUN, or a range written high-low, is an
    error, and nothing changes.
    """
    from .errors import RetryRefused

    if force and ids is None:
        raise click.UsageError("--force goes with --ids: name the succeeded tasks to run again")
    if failed_only and everything:
        raise click.UsageError("--failed and --all contradict each other: choose one")
    if ids is not None and (failed_only or everything):
        raise click.UsageError("--ids names exactly the tasks to retry: drop --failed/--all")
    wanted = _ids(ids)
    run = _open(run_dir)
    try:
        n = run.retry(_known(run, wanted, run_dir) if wanted is not None else None,
                      failed_only=not everything, force=force)
    except RetryRefused as exc:
        raise RetryRefused(exc.succeeded, exc.asked, "add --force") from None
    click.echo(f"{n:,} task(s) will run again; now: pipefarm run {run_dir}")


@main.command()
@click.argument("run_dir", metavar="RUN")
@click.option("--ids", metavar="ID,...", help="Only these tasks (ids or ranges); default: every unfinished task.")
def cancel(run_dir: str, ids: str | None) -> None:
    """Cancel unfinished tasks; tasks that depend on them are skipped.

    \b
      pipefarm cancel runs/sweep --ids 100-200
      pipefarm retry runs/sweep --all            # changed your mind: run them after all
    `pipefarm run` then counts them as cancelled (exit status 1), not as failures.
    """
    run = _open(run_dir)
    wanted = _ids(ids)
    n = run.cancel(None if wanted is None else _known(run, wanted, run_dir))
    click.echo(f"{n:,} task(s) cancelled"
               + (f"; to run them after all: pipefarm retry {run_dir} --all" if n else ""))


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
    from .observe.failures import failures as groups_of

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


# --- many hosts: worker and array -------------------------------------------------------------------
def _array_spec(scheduler: str, run_dir: str, *, walltime: str | None, python: str | None,
                **fields: Any) -> Any:
    """The ArraySpec of ``pipefarm array``'s options, checked before anything is written.

    Every mistake (a bad --time, --mem, --pe, a warning not shorter than the walltime, a path
    the scheduler cannot take, a missing python) is one UsageError; a python under a
    node-local directory is one warning line.
    """
    import shlex

    from .backends.schedulers import ArraySpec, check_python, render, time_seconds

    try:
        secs = time_seconds(walltime, scheduler)  # two fields: the scheduler's convention
        warn = fields.get("warn_seconds", 0)
        if secs is not None and warn >= secs:
            raise ValueError(
                f"--warn-seconds {warn} is not shorter than the walltime: --time {walltime} is "
                f"{secs} s for {scheduler}; lower --warn-seconds (0: no warning) or raise --time"
            )
        hms = None if secs is None else f"{secs // 3600}:{secs // 60 % 60:02d}:{secs % 60:02d}"
        if python is not None:
            fields["python"] = python
        spec = ArraySpec(run_dir=run_dir, time=hms, **fields)
        render(scheduler, spec)  # refuses paths its directives cannot take
        warning = check_python(spec.python)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if warning:
        click.echo(f"pipefarm: warning: {warning}", err=True)
    if python is None and spec.setup:
        click.echo(f"pipefarm: note: the workers start with {shlex.quote(spec.python)}, not the "
                   "python of the --setup environment (--python python3 for that)", err=True)
    return spec


@main.command()
@click.argument("run_dir", metavar="RUN")
@click.option("--element", type=int, default=None, help="This worker's array element (from the scheduler).")
@click.option("--signal", "sig", default="TERM", show_default=True, help="The walltime warning signal: stop claiming, finish the running task, hand the rest back.")
@click.option("--idle-exit", type=click.FloatRange(min=0), default=None, help="Exit after this many seconds with nothing to claim.")
@click.option("--id", "worker_id", default=None, help="Worker id (default: host-pid-random).")
def worker(run_dir: str, element: int | None, sig: str, idle_exit: float | None,
           worker_id: str | None) -> None:
    """The worker loop that array elements and srun/mpiexec-launched processes run.

    \b
      pipefarm worker runs/sweep                # usually written into a script by `pipefarm array`
    It claims blocks of tasks through the run directory alone (exclusive-create claim files,
    its own journal and heartbeat file), runs them, and exits when nothing is left. On the
    warning signal it stops claiming, finishes its running task and hands the rest back at once.
    """
    import signal as signals

    from .store.fsjournal import new_worker_id, work_loop
    from .worker import reset_inherited_signals

    # The array scripts start workers as background jobs with USR1/USR2 ignored: every
    # inherited "ignore" becomes a do-nothing handler (the worker stays immune to a
    # scheduler's group-wide USR1/USR2, its tasks start with default dispositions and an
    # empty signal mask, so a simulation that checkpoints on SIGUSR1 hears it)
    reset_inherited_signals()
    if not Path(run_dir).is_dir():
        raise click.UsageError(f"run {run_dir} does not exist (no such directory)")
    if not (Path(run_dir) / "fs" / "wave").exists():
        raise click.UsageError(f"{run_dir} has no exported tasks; use `pipefarm array` to start workers")
    name = sig.upper().removeprefix("SIG")
    try:
        drain = {getattr(signals, f"SIG{name}"), signals.SIGTERM, signals.SIGINT, signals.SIGHUP}
    except AttributeError:
        raise click.BadParameter(f"unknown signal {sig!r}", param_hint="--signal") from None
    prefix = f"e{element}-" if element is not None else ""
    stats = work_loop(run_dir, worker_id or new_worker_id(prefix), drain_signals=drain,
                      idle_exit=idle_exit)
    click.echo(f"worker done: {stats}", err=True)


@main.command()
@click.argument("run_dir", metavar="RUN")
@click.option("--scheduler", type=click.Choice(["slurm", "pbs", "sge", "htcondor", "lsf"]), help="Write (and submit) a job array for this scheduler.")
@click.option("--launch", "launcher", type=click.Choice(["srun", "mpiexec"]), help="Inside an allocation: start the workers with this launcher and wait.")
@click.option("--elements", type=click.IntRange(min=1), default=1, show_default=True, help="Array elements (jobs).")
@click.option("--workers-per-element", "-w", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("-n", "--workers", "n_workers", type=click.IntRange(min=1), help="With --launch: number of worker processes.")
@click.option("--time", "walltime", help="Walltime per element: minutes (--time 90), HH:MM:SS or D-HH:MM:SS. Two fields follow the scheduler: --time 2:00 is 2 minutes for SLURM and PBS (MM:SS), 2 hours for LSF (HH:MM); SGE and HTCondor want HH:MM:SS.")
@click.option("--partition", "--queue", "partition", help="Partition (SLURM) or queue.")
@click.option("--account", help="Account / project to charge.")
@click.option("--cpus-per-worker", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--gpus-per-worker", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--throttle", type=click.IntRange(min=1), help="At most this many elements at once (SLURM %N).")
@click.option("--extra", multiple=True, help="Passed verbatim to the named scheduler as one directive after the generated ones (its prefix, e.g. #SBATCH, is added unless the line starts with #; HTCondor: a submit command), e.g. --extra '--qos=long' (repeatable).")
@click.option("--mem", help="Memory per element, e.g. --mem 16G (units K, M, G, T, binary; a bare number is MiB), written in the scheduler's own syntax: SLURM --mem, PBS select :mem=, SGE -l h_vmem= (per slot, divided for you), HTCondor request_memory, LSF -R rusage[mem=].")
@click.option("--mem-per-worker", help="Memory per worker, e.g. --mem-per-worker 4G: each element asks for -w times as much (instead of --mem).")
@click.option("--pe", "parallel_env", default="smp", show_default=True, help="SGE parallel environment for elements of more than one slot, e.g. --pe mpislots.")
@click.option("--setup", multiple=True, metavar="LINE", help="A shell line run in each element before the workers start, in order (repeatable), e.g. --setup 'module load python/3.11' --setup 'source ~/venv/bin/activate'. A failing line stops the element.")
@click.option("--python", "python", metavar="PATH", help="The Python that starts the workers (default: the one running this command, checked to exist). A bare name is looked up on the element's PATH after --setup: --setup 'source ~/venv/bin/activate' --python python3.")
@click.option("--signal", "sig", default="TERM", show_default=True, help="Walltime warning signal sent to the workers.")
@click.option("--warn-seconds", type=click.IntRange(min=0), default=120, show_default=True, help="How long before the walltime the warning comes; shorter than --time (0: no warning), e.g. --warn-seconds 600.")
@click.option("--dry-run", is_flag=True, help="Also print the submit script on stdout, exactly as written (notes go to stderr); submit nothing. It can be saved and submitted as is: --dry-run > job.sh && sbatch job.sh.")
@click.option("--submit", "do_submit", is_flag=True, help="Submit the script with the scheduler's own command.")
@click.option("--wait", is_flag=True, help="Follow the job to its end, folding results as they come.")
@click.option("--poll", type=click.FloatRange(min=1), default=30.0, show_default=True, help="Seconds between scheduler queries while waiting.")
@click.option("--lease", type=click.FloatRange(min=1), default=None, help="Seconds without a heartbeat before a worker's blocks are taken over (default 60; fixed at the first export).")
def array(run_dir: str, scheduler: str | None, launcher: str | None, elements: int,
          workers_per_element: int, n_workers: int | None, walltime: str | None,
          partition: str | None, account: str | None, cpus_per_worker: int,
          gpus_per_worker: int, throttle: int | None, extra: tuple[str, ...], mem: str | None,
          mem_per_worker: str | None, parallel_env: str, setup: tuple[str, ...],
          python: str | None, sig: str, warn_seconds: int, dry_run: bool, do_submit: bool,
          wait: bool, poll: float, lease: float | None) -> int:
    """Run RUN's tasks on many hosts: a scheduler job array of `pipefarm worker`s.

    \b
      pipefarm array runs/sweep --scheduler slurm --elements 16 -w 4 --time 2:00:00 --dry-run
      pipefarm array runs/sweep --scheduler slurm --elements 16 -w 4 --time 2:00:00 --submit --wait
      pipefarm array runs/sweep --launch srun -n 64      # inside an salloc/sbatch allocation
      pipefarm array runs/sweep --scheduler sge --elements 4 --mem 8G --pe mpi \\
          --setup 'module load python/3.11' --setup 'source ~/venv/bin/activate' --python python3

    With --scheduler it exports the ready tasks and writes the submit script under RUN/array
    (printing its path and the command that submits it); --submit also submits it, --dry-run
    also prints it. Workers coordinate through the run directory alone; a lost element's blocks are taken
    over by the others once its heartbeat is older than the lease.
    """
    from .backends import array as arr

    if (scheduler is None) == (launcher is None):
        raise click.UsageError("choose one of --scheduler and --launch")
    run = _open(run_dir)
    if lease is not None:
        run.store.lease_s = lease
    if launcher is not None:
        summary = arr.launch(run, launcher, n_workers or elements * workers_per_element,
                             signal=sig)
        click.echo(str(summary), err=True)
        return 0 if summary.ok else EXIT_FAILED_TASKS
    assert scheduler is not None
    spec = _array_spec(scheduler, str(run.path), elements=elements,
                       workers_per_element=workers_per_element, walltime=walltime,
                       partition=partition, account=account, cpus_per_worker=cpus_per_worker,
                       gpus_per_worker=gpus_per_worker, throttle=throttle, extra=list(extra),
                       signal=sig, warn_seconds=warn_seconds, mem=mem,
                       mem_per_worker=mem_per_worker, parallel_env=parallel_env,
                       setup=list(setup), python=python)
    backend = arr.ArrayBackend(scheduler, spec, poll_s=poll)
    script = backend.prepare(run)  # the tasks exported: a printed script runs as is
    if dry_run:
        click.echo(script.read_text(), nl=False)
        extra_files = sorted(p.name for p in script.parent.iterdir()
                             if p.name.startswith(f"{spec.job_name}.{scheduler}.") and p != script)
        also = f" (with {', '.join(extra_files)}, which it runs)" if extra_files else ""
        click.echo(f"pipefarm: wrote {script}{also}; nothing submitted", err=True)
        return 0
    if not do_submit:
        from .backends.schedulers import submit_command

        cmd = submit_command(scheduler, script)
        how = " ".join(cmd.argv) + (f" < {cmd.stdin}" if cmd.stdin else "")
        click.echo(f"wrote {script}; submit it with: {how}  (or add --submit)")
        return 0
    job = backend.submit(run, script)
    click.echo(f"submitted {scheduler} job {job} ({elements} x {workers_per_element} workers)")
    if not wait:
        click.echo(f"follow it with: pipefarm status {run_dir}")
        return 0
    from .observe.progress import ProgressDisplay

    display = ProgressDisplay(interval_s=poll)
    summary = backend.wait(run, job, on_progress=display)
    display.close(summary.counts)
    click.echo(str(summary), err=True)
    if not summary.ok:
        left = arr.counts_left(summary.counts)
        if left:
            how = (f"{scheduler} no longer reports job {job} and no worker heartbeats"
                   if backend.ended == "gone" else f"{scheduler} job {job} ended ({backend.ended})")
            click.echo(
                f"the array is over: {how}, with {sum(left.values()):,} task(s) left ("
                + ", ".join(f"{n:,} {k}" for k, n in left.items()) + ").\n"
                f"finish them here: pipefarm run {run_dir}\n"
                f"or in another array: pipefarm array {run_dir} --scheduler {scheduler} --submit"
                " (with the same options)", err=True)
        return EXIT_FAILED_TASKS
    return 0


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
    from .observe.runs import list_runs

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
        left = sum(c[k] for k in ("blocked", "ready", "claimed", "running"))
        bad = c["failed"] + c["skipped"] + c["cancelled"]
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
    from .backends.array import sync
    from .observe.show import render_text, show_task

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

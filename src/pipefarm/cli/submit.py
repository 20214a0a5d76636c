"""``pipefarm submit``: command tasks from a template and one source of values.

::

    CMD + (--array | --from-file | --from-csv | --from-json | ::: / ::::) -> rows
    rows (+ --key TEMPLATE, rendered row by row) -> Run.add_commands -> the catalog

A refused submission leaves no new run directory behind (:meth:`~pipefarm.run.Run.undo_create`).
"""

from __future__ import annotations

import click

from .app import _die, _shown, main
from .params import _ids, _Seconds


class _Memory(click.ParamType):
    """A memory size such as ``4G`` or ``500M`` (binary units; a bare number is MiB), in bytes."""

    name = "size"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> object:
        if value is None or isinstance(value, int):
            return value
        from ..execute.memory import parse_memory

        try:
            return parse_memory(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class _TimeRequest(click.ParamType):
    """The time a task needs: seconds (``5400``), ``HH:MM:SS`` or ``D-HH:MM:SS``."""

    name = "time"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> object:
        if value is None or isinstance(value, (int, float)):
            return value
        text = str(value).strip()
        try:
            if ":" in text:
                from ..backends.array.spec import walltime_seconds

                return float(walltime_seconds(text) or 0)
            from ..run import checked_time_request

            return checked_time_request(text)
        except Exception as exc:  # noqa: BLE001 - ValueError or SubmissionError: one message
            self.fail(f"{exc}; give seconds, HH:MM:SS or D-HH:MM:SS, e.g. 5400 or 1:30:00",
                      param, ctx)


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
@click.option("--mem", "memory", type=_Memory(), help="Memory limit per task, e.g. --mem 4G (K, M, G, T; a bare number is MiB): past it the task's process group is killed and its attempt ends oom (retried like a failure).")
@click.option("--time-request", "time_request", type=_TimeRequest(), help="Time each task needs: seconds, or HH:MM:SS; an array worker with less walltime left (before its warning) leaves it for one with more, e.g. --time-request 4:00:00.")
@click.option("--checkpoint-dir", "checkpoint_dir", is_flag=True, help="Give each task a directory of its own, kept across its attempts, in $PIPEFARM_CHECKPOINT_DIR (RUN/checkpoints/<id>): what an attempt writes there, the next one finds; removed when the task succeeds.")
@click.option("--keep-checkpoints", is_flag=True, help="Keep each task's checkpoint directory after it succeeds.")
@click.option("--after", metavar="ID,...", help="Task ids (or ranges 1-100) that must succeed first.")
@click.option("--tag", "tags", multiple=True, help="A label (repeatable).")
@click.option("--cwd", help="Working directory (may hold placeholders).")
@click.option("--env", "env", multiple=True, metavar="K=V", help="Environment variable for the tasks (repeatable).")
@click.option("--key", "key_template", metavar="TEMPLATE", help="A name per task from the placeholders, e.g. 'a{alpha}-b{beta}'.")
@click.option("--output-cap", type=click.IntRange(min=0), default=1 << 20, show_default=True, help="Bytes of stdout and of stderr kept per attempt.")
@click.option("--output-per-task", is_flag=True, help="One log file per attempt instead of a few per worker.")
@click.option("--cache", "cache", is_flag=True, help="Use the result cache: a task whose argv, cwd, --cache-env values and --cache-input contents match an earlier success is not run again (outcome cached).")
@click.option("--cache-dir", metavar="DIR", help="The result cache directory (default: $PIPEFARM_CACHE, else ~/.cache/pipefarm).")
@click.option("--cache-env", "cache_env", multiple=True, metavar="NAME", help="An environment variable whose value is part of the cache key (repeatable).")
@click.option("--cache-input", "cache_inputs", multiple=True, metavar="FILE|{placeholder}", help="A file whose content is part of the cache key, hashed when the task is about to run, e.g. --cache-input {line} (repeatable).")
def submit(run_dir: str, command: tuple[str, ...], array_spec: str | None, from_file: str | None,
           from_csv: str | None, from_json: str | None, shell: bool, retries: int,
           timeout: float | None, priority: int, cost: float | None, cpus: int, gpus: int,
           memory: int | None,
           after: str | None, tags: tuple[str, ...], cwd: str | None, env: tuple[str, ...],
           key_template: str | None, output_cap: int, output_per_task: bool,
           time_request: float | None = None, keep_checkpoints: bool = False,
           checkpoint_dir: bool = False,
           cache: bool = False, cache_dir: str | None = None, cache_env: tuple[str, ...] = (),
           cache_inputs: tuple[str, ...] = ()) -> None:
    """Add command tasks to RUN (created if needed).

    \b
    Placeholders in CMD are filled per task from one source:
      pipefarm submit runs/a --array 0-9999 -- ./sim --seed {index}
      pipefarm submit runs/b --from-file inputs.txt -- gzip -k {line}
      pipefarm submit runs/c --from-csv params.csv --retries 2 --timeout 600 -- ./sim {alpha} {beta}
      pipefarm submit runs/d --shell --from-file names.txt -- 'grep -c x {line} > {line}.count'
      pipefarm submit runs/m --array 1-50 --mem 4G --retries 1 -- ./sim --seed {index}
      pipefarm submit runs/l --array 1-20 --time-request 4:00:00 --checkpoint-dir -- ./long_sim --seed {index}
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
    with e.g. PIPEFARM_LARGE_SUBMISSION=100000. With --cache, a task that succeeded before
    (same argv, cwd, --cache-env values and --cache-input contents) is not run again:
      pipefarm submit runs/j --cache --cache-input {line} --from-file inputs.txt -- gzip -k {line}
    """
    from .. import sources
    from ..execute.template import Command, name_default, placeholders
    from ..run import Run
    from ..task import TaskOptions

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
    try:
        source = sources.choose(array=array_spec, from_file=from_file, from_csv=from_csv,
                                from_json=from_json, groups=groups)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if source.only is not None:
        cmd = name_default(cmd, source.only)
        key_cmd = name_default(key_cmd, source.only) if key_cmd is not None else None
        if cache_inputs:  # --cache-input {} names the single source's value too
            cache_inputs = tuple(name_default(Command(argv=list(cache_inputs)),
                                              source.only).argv or ())
    options = TaskOptions(retries=retries, timeout=timeout, priority=priority, cost=cost,
                          after=tuple(_ids(after) or ()), cpus=cpus, gpus=gpus, memory=memory,
                          tags=tags, time_request=time_request,
                          keep_checkpoints=keep_checkpoints, checkpoint_dir=checkpoint_dir,
                          cache=cache, cache_dir=cache_dir,
                          cache_env=cache_env, cache_inputs=cache_inputs)
    run = Run.create(run_dir, exist_ok=True)
    try:
        if source.size is not None:  # after create: a Ctrl-C once it is said is undone in full
            _note_large(source.size, source.value_bytes, run_dir)
        ids = run.add_commands(cmd, source.rows, options, key_template=key_cmd)
    except BaseException:  # refused, or Ctrl-C: the transaction rolled back
        run.undo_create()
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
    from ..execute.template import has_surrogates

    for arg in args:
        if arg is not None and has_surrogates(arg):
            hint = ("; give such bytes as values (after ::: or in a --from-file), which reach "
                    "the command byte-exact") if what == "CMD" else ""
            _die(f"{what + ' ' if what else ''}argument {_shown(arg)} is not valid UTF-8{hint}")



def _note_large(size: int, value_bytes: float, run_dir: str) -> None:
    """One line on stderr before a large submission is written: how many tasks, how much disk."""
    import os

    from ..sources import LARGE_SUBMISSION, catalog_estimate

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


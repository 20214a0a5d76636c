"""Many hosts: ``pipefarm array`` (a scheduler job array, or workers started with srun or
mpiexec) and ``pipefarm worker``, the loop each of those processes runs.

::

    pipefarm array --scheduler S -> export ready tasks -> submit script -> N x pipefarm worker
    pipefarm worker -> claim blocks through RUN/fs -> run them -> journal -> folded by status/run
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .app import EXIT_FAILED_TASKS, _open, main


# --- many hosts: worker and array -------------------------------------------------------------------
def _array_spec(scheduler: str, run_dir: str, *, walltime: str | None, python: str | None,
                **fields: Any) -> Any:
    """The ArraySpec of ``pipefarm array``'s options, checked before anything is written.

    Every mistake (a bad --time, --mem, --pe, a warning not shorter than the walltime, a path
    the scheduler cannot take, a missing python) is one UsageError; a python under a
    node-local directory is one warning line.
    """
    import shlex

    from ..backends.array import ArraySpec, check_python, render, time_seconds

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
@click.option("--time", "walltime", help="This worker's walltime from now: minutes (--time 90), HH:MM:SS or D-HH:MM:SS. It starts no task that asked for more time (submit --time-request) than it has left. Default: from the scheduler (SLURM_JOB_END_TIME, PIPEFARM_WALLTIME_END that `pipefarm array --time` scripts set, or squeue in a SLURM job); none: no limit.")
@click.option("--warn-seconds", type=click.FloatRange(min=0), default=None, help="How long before the walltime its warning signal comes: tasks must fit before it (default: PIPEFARM_WARN_SECONDS, else 0).")
def worker(run_dir: str, element: int | None, sig: str, idle_exit: float | None,
           worker_id: str | None, walltime: str | None = None,
           warn_seconds: float | None = None) -> None:
    """The worker loop that array elements and srun/mpiexec-launched processes run.

    \b
      pipefarm worker runs/sweep                # usually written into a script by `pipefarm array`
      pipefarm worker runs/sweep --time 4:00:00 --warn-seconds 300   # started by hand
    It claims blocks of tasks through the run directory alone (exclusive-create claim files,
    its own journal and heartbeat file), runs them, and exits when nothing is left. On the
    warning signal it stops claiming, finishes its running task and hands the rest back at once.
    Tasks submitted with --time-request longer than its walltime left (less the warning) are
    left for a worker with more time; it exits once only such tasks are left.
    """
    import signal as signals

    from ..backends.array.worker_loop import work_loop
    from ..store.shared_fs import new_worker_id
    from ..worker import reset_inherited_signals

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
    from ..backends.array.spec import walltime_seconds
    from ..backends.array.walltime import find_walltime

    try:
        secs = walltime_seconds(walltime)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--time") from None
    limit = find_walltime(secs, warn_seconds)
    click.echo(f"pipefarm worker: {limit.describe()}", err=True)
    prefix = f"e{element}-" if element is not None else ""
    stats = work_loop(run_dir, worker_id or new_worker_id(prefix), drain_signals=drain,
                      idle_exit=idle_exit, time_left=limit.left if limit.end is not None else None)
    if stats.exit == "no time":
        click.echo(f"pipefarm worker: what is left asked for more time than the {limit.left():.0f} s"
                   " this worker has left; it is left for a worker with more"
                   " (pipefarm status counts it)", err=True)
    click.echo(f"worker done: {stats}", err=True)


def _too_long_for(run: Any, spec: Any) -> int:
    """Tasks left that asked for more time than the elements of ``spec`` had (0 without a
    walltime)."""
    if not spec.seconds:
        return 0
    from ..store.sqlite.query import CatalogQuery

    with CatalogQuery.open(run.path) as q:
        return q.ready_asking_more_than(spec.seconds - spec.warn_seconds)


@main.command()
@click.argument("run_dir", metavar="RUN")
@click.option("--scheduler", type=click.Choice(["slurm", "pbs", "sge", "htcondor", "lsf"]), help="Write (and submit) a job array for this scheduler.")
@click.option("--launch", "launcher", type=click.Choice(["srun", "mpiexec"]), help="Inside an allocation: start the workers with this launcher and wait.")
@click.option("--elements", type=click.IntRange(min=1), default=1, show_default=True, help="Array elements (jobs).")
@click.option("--workers-per-element", "-w", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("-n", "--workers", "n_workers", type=click.IntRange(min=1), help="With --launch: number of worker processes.")
@click.option("--backend", "launch_backend", type=click.Choice(["array", "mpi"]), default="array", show_default=True, help="With --launch: array starts -n `pipefarm worker`s that share the run directory; mpi starts one MPI job of -n worker ranks plus rank 0, the coordinator (pipefarm run RUN --backend mpi under the launcher; needs pipefarm[mpi]).")
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
          workers_per_element: int, n_workers: int | None, launch_backend: str,
          walltime: str | None,
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
      pipefarm array runs/sweep --launch mpiexec -n 64 --backend mpi   # rank 0 coordinates
      pipefarm array runs/sweep --scheduler sge --elements 4 --mem 8G --pe mpi \\
          --setup 'module load python/3.11' --setup 'source ~/venv/bin/activate' --python python3

    With --scheduler it exports the ready tasks and writes the submit script under RUN/array
    (printing its path and the command that submits it); --submit also submits it, --dry-run
    also prints it. Workers coordinate through the run directory alone; a lost element's blocks are taken
    over by the others once its heartbeat is older than the lease.
    """
    from ..backends import array as arr

    if (scheduler is None) == (launcher is None):
        raise click.UsageError("choose one of --scheduler and --launch")
    if launch_backend == "mpi":
        if launcher is None:
            raise click.UsageError("--backend mpi goes with --launch (a job array of MPI jobs"
                                   " is not supported); use --backend array with --scheduler")
        from ..backends.mpi.launch import launch as launch_mpi

        _open(run_dir)  # a clear error for a directory that is not a run, before any rank starts
        return launch_mpi(launcher, n_workers or elements * workers_per_element, run_dir,
                          python=python)
    run = _open(run_dir)
    if lease is not None:
        run.use_lease(lease)
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
        from ..backends.array import submit_command

        cmd = submit_command(scheduler, script)
        how = " ".join(cmd.argv) + (f" < {cmd.stdin}" if cmd.stdin else "")
        click.echo(f"wrote {script}; submit it with: {how}  (or add --submit)")
        return 0
    job = backend.submit(run, script)
    click.echo(f"submitted {scheduler} job {job} ({elements} x {workers_per_element} workers)")
    if not wait:
        click.echo(f"follow it with: pipefarm status {run_dir}")
        return 0
    from ..progress import ProgressDisplay

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
            short = _too_long_for(run, spec)
            if short:
                click.echo(f"{short:,} of them asked for more time (--time-request) than an element"
                           f" has before its warning ({spec.seconds - spec.warn_seconds:,} s):"
                           " give the next array a longer --time", err=True)
        return EXIT_FAILED_TASKS
    return 0

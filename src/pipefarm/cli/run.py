"""The verbs that run a run or change what it will run: ``run``, ``retry``, ``cancel``."""

from __future__ import annotations

from typing import Any

import click

from ..states import left_count
from .app import EXIT_FAILED_TASKS, _open, main
from .params import _BackendName, _ids, _known

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
    from ..backends.local import HaltPolicy

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
    left = left_count(counts)
    if left:
        lines.append(f"{left:,} task(s) not finished; resume with: pipefarm run {run_dir}")
    return lines


@main.command("run")
@click.argument("run_dir", metavar="RUN")
@click.option("--workers", "-w", type=click.IntRange(min=1), help="Worker processes (default: the CPU count).")
@click.option("--backend", type=_BackendName(), default="local", show_default=True,
              help="Where the tasks run: local (worker processes on this host), sequential (one"
                   " by one in this process), mpi (under mpiexec/srun: rank 0 coordinates, the"
                   " other ranks run tasks), dask (a Dask cluster: --address, else a LocalCluster),"
                   " or a backend a package installed (its entry-point name).")
@click.option("--address", metavar="ADDR", help="The engine to connect to, for backends that"
              " take one (e.g. --backend dask --address tcp://host:8786).")
@click.option("--gpus-available", metavar="LIST", help="GPU ids to hand out, e.g. 0,1,2,3 (default: detected on this host; none for mpi).")
@click.option("--halt", metavar="WHEN,fail=N", callback=_halt_spec, help="Stop early when tasks fail (as GNU parallel): soon,fail=3 hands out no new task after 3 failures, the running ones finish; now,fail=3 stops the running ones too (released, no retry spent); soon,fail=10% counts the share of ended tasks (from 10 ended on).")
@click.option("--no-progress", is_flag=True, help="No progress display.")
def run_cmd(run_dir: str, workers: int | None, backend: str, address: str | None,
            gpus_available: str | None, halt: str | None, no_progress: bool) -> int:
    """Execute RUN (or resume it): every task not finished yet.

    \b
      pipefarm run runs/sweep --workers 8
      pipefarm run runs/sweep --halt soon,fail=5     # stop handing out tasks after 5 failures
    Progress shows on a terminal as a bar, elsewhere as a line every 10 s. Ctrl-C stops
    cleanly; run it again to resume. Tasks that need more GPUs than there are stop it before
    anything runs (exit 2).
    Exit status: 0 all succeeded, 1 some did not, 3 halted by --halt, 130 Ctrl-C, 143 SIGTERM.
    """
    options: dict[str, Any] = {}
    if address is not None:
        if backend in ("local", "sequential"):
            raise click.UsageError(f"--address is for engines elsewhere; --backend {backend}"
                                   " runs on this host")
        options["address"] = address
    if backend == "mpi":  # ranks 1..N-1 serve rank 0's workers and exit here: they never open RUN
        from ..backends.mpi import serve_if_worker_rank

        serve_if_worker_rank()
        try:
            run = _open(run_dir)
        except BaseException:  # not a run: the worker ranks would wait for rank 0 forever
            from ..backends.mpi import release_worker_ranks

            release_worker_ranks()
            raise
    else:
        run = _open(run_dir)
    if gpus_available is not None and backend in ("local", "mpi"):
        from ..execute.gpus import parse_device_list

        options["gpus_available"] = parse_device_list(gpus_available)
    if halt is not None:
        if backend == "sequential":
            raise click.UsageError("--halt needs a backend with a coordinator (local, mpi, dask,"
                                   " ...), not --backend sequential")
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
    from ..errors import RetryRefused

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

"""The ``watch`` verb: a run's live view in the terminal (observe/watch.py, observe/watch_tui.py)."""

from __future__ import annotations

import sys

import click

from .app import main


@main.command()
@click.argument("run_dir", metavar="RUN")
@click.option("--interval", type=float, default=1.0, show_default=True,
              help="Seconds between reads of the run (pipefarm watch runs/sweep --interval 5).")
@click.option("--once", is_flag=True,
              help="Print one text view and exit, no terminal app (pipefarm watch runs/sweep --once).")
def watch(run_dir: str, interval: float, once: bool) -> None:
    """A live view of a run: counts, rate and ETA, running tasks, workers, failures.

    \b
      pipefarm watch runs/sweep
      pipefarm watch runs/sweep --interval 5      # a huge run, a slow link
      pipefarm watch runs/sweep --once            # one text view, for scripts and logs
    \b
    Keys: q quit; f every failure group; l or Enter the last lines of the selected running
    task's (or failure's example task's) output; Tab the next table; Escape back.
    Fits 80x24 (over ssh). Works on a live, finished, stopped or crashed run, array runs
    included (it folds their journals as `pipefarm status` does, and lists array workers
    by their heartbeat files). Only reads the run; reading never slows it down.
    """
    from ..observe.snapshot import prepare

    if not interval > 0:
        raise click.UsageError(f"--interval must be more than 0 seconds, not {interval}")
    prepare(run_dir)  # no run there: one line, before any screen is drawn
    if once or not sys.stdout.isatty():
        from ..observe.watch import render_text

        click.echo(render_text(run_dir))
        return
    try:
        import textual  # noqa: F401
    except ImportError:
        raise click.ClickException("the live view needs textual: pip install 'pipefarm[watch]'"
                                   " (or use --once)") from None
    from ..observe.watch import RunWatch

    RunWatch(run_dir, interval).run()

"""The ``report`` verb: one self-contained HTML file about a run (observe/report.py)."""

from __future__ import annotations

import os
import sys

import click

from .app import _open, main


def default_output(run_dir: str) -> str:
    """``NAME-report.html`` in the current directory, NAME being the run directory's name."""
    name = os.path.basename(os.path.normpath(os.path.abspath(run_dir))) or "run"
    return f"{name}-report.html"


@main.command()
@click.argument("run_dir", metavar="RUN")
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True),
              help="File to write (- : stdout). Default: NAME-report.html in the current "
                   "directory, NAME being RUN's directory name "
                   "(pipefarm report runs/sweep -o /tmp/sweep.html).")
def report(run_dir: str, output: str | None) -> None:
    """One HTML file about a run, to open offline or attach to a ticket.

    \b
      pipefarm report runs/sweep                  # writes ./sweep-report.html
      pipefarm report runs/sweep -o ticket-123.html
      pipefarm report runs/sweep -o - | gzip > sweep.html.gz
    \b
    Holds: counts by state and attempts by outcome, wall and busy time, throughput
    and duration percentiles; tasks ended over time; a duration histogram per function
    or command; each worker's busy fraction; the latest 5,000 attempts as a Gantt
    chart per worker, coloured by outcome; failure groups with an example's exit code
    and last stderr lines. Charts are inline SVG: the file fetches nothing and its size
    stays bounded (a few MB at most) however many tasks the run has.
    Works on a finished, stopped, crashed or running run, and folds a shared-filesystem
    (array) run first, as `pipefarm status` does. Only reads the run: the report is
    written outside it by default (run directories are private), whole or not at all.
    """
    from ..backends.array import sync
    from ..observe.report import render, write_report

    run = _open(run_dir)
    sync(run)  # a shared-filesystem run: fold what the workers journaled
    if output == "-":
        sys.stdout.write(render(run))
        sys.stdout.flush()
        return
    path = output or default_output(run_dir)
    try:
        size = write_report(run, path)
    except OSError as exc:
        raise click.ClickException(f"cannot write {path}: {exc.strerror or exc}; "
                                   "nothing was written") from None
    click.echo(f"wrote {path} ({size / 1024:,.0f} KiB)")

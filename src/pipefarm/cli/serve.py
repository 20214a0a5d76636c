"""The ``serve`` verb: the web dashboard and Prometheus ``/metrics`` of a run or a directory.

The server lives in :mod:`pipefarm.observe.dashboard`; this module parses, checks the bind
and prints where it serves.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import click

from .app import _die, main


@main.command()
@click.argument("target", metavar="RUN|DIR", required=False, type=click.Path(file_okay=False))
@click.option("--port", type=int, default=8787, show_default=True,
              help="Port to listen on; 0 takes any free one (pipefarm serve runs/sweep --port 0).")
@click.option("--bind", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs --token "
                   "(pipefarm serve runs/sweep --bind 0.0.0.0 --token \"$(openssl rand -hex 16)\").")
@click.option("--token", envvar="PIPEFARM_TOKEN", default=None,
              help="Secret for actions (retry, cancel), and for every request off loopback; "
                   "also read from $PIPEFARM_TOKEN, which keeps it out of `ps` "
                   "(PIPEFARM_TOKEN=s3cret pipefarm serve runs/sweep).")
@click.option("--grafana-json", is_flag=True,
              help="Print the Grafana dashboard for /metrics and exit "
                   "(pipefarm serve --grafana-json > pipefarm-grafana.json).")
@click.option("--parent", type=int, default=None, hidden=True,
              help="Exit when this process is gone (execute(dashboard=True)'s server).")
@click.option("--nice", type=int, default=0, hidden=True, help="Lower this server's priority.")
def serve(target: str | None, port: int, bind: str, token: str | None, grafana_json: bool,
          parent: int | None, nice: int) -> None:
    """A live web dashboard of RUN, or of every run under DIR, with Prometheus /metrics.

    \b
      pipefarm serve runs/sweep                 # open http://127.0.0.1:8787/
      pipefarm serve runs                       # the runs under runs/, each a link
      pipefarm serve runs/sweep --port 0        # any free port
      pipefarm serve runs/sweep --token s3cret  # enables "retry this group"
      ssh -L 8787:localhost:8787 login-node     # from a laptop, then open the URL
      curl -s localhost:8787/metrics | grep pipefarm_tasks
      curl -s localhost:8787/api/snapshot | jq .overview.counts
      curl -s -H 'Authorization: Bearer s3cret' -d '{"ids":[4,7]}' \\
           -H 'Content-Type: application/json' localhost:8787/api/retry
    \b
    Pages: overview (counts, progress, throughput, ETA), task stream (attempts per worker
    over time, by outcome), durations (histogram, p50/p95 per function or command),
    failure groups (each with an example's stderr and a retry action), and a page per task
    with its attempts and their logs. JSON: /api/snapshot, /api/events (SSE), /api/stream,
    /api/durations, /api/failures, /api/task/ID, /api/log/ID?stream=stderr; under a
    DIR, /api/runs and each run's pages at /run/NAME/. /metrics: Prometheus text.
    Only reads runs, except the actions (POST /api/retry and /api/cancel), which need the
    token. Binds to loopback unless told; Ctrl-C stops it.
    """
    if grafana_json:
        from importlib import resources

        click.echo(resources.files("pipefarm.observe").joinpath("grafana.json").read_text(), nl=False)
        return
    if target is None:
        _die("give a run or a directory of runs to serve (or --grafana-json)")
        return
    if not Path(target).is_dir():
        _die(f"{target} is not a run or a directory")
    from ..observe.dashboard import start

    try:
        dash = start(target, port=port, bind=bind, token=token)
    except ValueError as exc:
        _die(str(exc))
        return
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            _die(f"port {port} on {bind} is in use: give --port N (0: any free port)")
        _die(f"cannot listen on {bind}:{port}: {exc.strerror or exc}")
        return
    click.echo(f"serving {target} at {dash.url}  (metrics: {dash.url.split('?')[0]}metrics;"
               " Ctrl-C stops)")
    if nice:
        os.nice(nice)
    try:
        while parent is None or os.getppid() == parent:
            time.sleep(1.0)  # a server whose parent run ended stops with it
    except KeyboardInterrupt:
        pass
    finally:
        dash.stop()

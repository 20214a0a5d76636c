"""Start-up: from the call that starts the work to the first task running.

Each task appends ``time.time()`` to a file when it starts (:func:`bench.tasks.stamp`); start-up is
the earliest stamp minus the time taken just before the call:

- pipefarm: ``run.execute()`` (the run is created and its tasks submitted before);
- ProcessPoolExecutor, joblib: the executor's creation / the ``Parallel`` call (the first submit
  follows at once);
- Dask, Ray: the cluster's creation (``LocalCluster`` / ``ray.init``), cold; a second row gives the
  time from a running cluster's first submit.

Imports happen before the clock starts for every system. Target: pipefarm < 0.3 s.
"""

from __future__ import annotations

import os
import tempfile

from .. import peers, tasks
from ..core import Context, Job, Row, metric_rows, workload

WL = "start"
TARGET = f"{__name__}:child"
N_TASKS = 4


def child(system: str, workers: int = 2, **opts) -> dict:
    fd, path = tempfile.mkstemp(prefix="pfbench-stamps-")
    os.close(fd)
    try:
        out = peers.run_map(system, tasks.stamp, [path] * N_TASKS, workers=workers, **opts)
        stamps = tasks.read_stamps(path)
    finally:
        os.unlink(path)
    if not stamps:
        raise RuntimeError("no task wrote its start time")
    first = min(stamps)
    t_call = out["t_execute_call"] if system == "pipefarm" else out["t0"]
    out["startup_s"] = first - t_call
    out["first_after_ready_s"] = first - out["t_ready"]
    out["stamps"] = len(stamps)
    return out


@workload(WL, "start-up: call to first task running", quick_s=30, full_s=70)
def run(ctx: Context) -> list[Row]:
    jobs = [
        Job("pipefarm", TARGET, {"system": "pipefarm"}, ctx.reps(5, 3), 60),
        Job("ProcessPool", TARGET, {"system": "ppe"}, ctx.reps(5, 3), 60),
        Job("joblib", TARGET, {"system": "joblib"}, ctx.reps(5, 3), 60),
        Job("Dask", TARGET, {"system": "dask"}, ctx.reps(3, 1), 120),
        Job("Ray", TARGET, {"system": "ray"}, ctx.reps(3, 1), 120),
    ]
    ms = ctx.measure(j for j in jobs if ctx.wants(j.kwargs["system"]))
    rows = metric_rows(
        WL,
        ms,
        "start-up to first task (cold)",
        "s",
        "startup_s",
        targets={"pipefarm": ("< 0.3 s", lambda v, r: None if v is None else v < 0.3)},
        notes={
            "pipefarm": "from run.execute()",
            "ProcessPool": "from ProcessPoolExecutor()",
            "joblib": "from Parallel()(...)",
            "Dask": "from LocalCluster()",
            "Ray": "from ray.init()",
        },
    )
    warm = {k: v for k, v in ms.items() if k in ("pipefarm", "Dask", "Ray")}
    if len(warm) > 1:
        rows += metric_rows(
            WL,
            warm,
            "first submit to first task (cluster up)",
            "s",
            "first_after_ready_s",
            notes={
                "pipefarm": "from run.map()",
                "Dask": "from client.map()",
                "Ray": "from f.remote()",
            },
        )
    return rows

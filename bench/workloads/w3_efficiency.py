"""W3 efficiency: 400 tasks of ``time.sleep(0.02)`` on 2 workers.

efficiency = ideal / wall, with ideal = tasks × 20 ms / 2 workers (4 s for 400 tasks) and wall
the time from the first submission to the last result (``run.map`` + ``run.execute`` for pipefarm,
worker start-up included; Dask's and Ray's cluster start-up excluded). Target: pipefarm ≥ 98 %.
The peers are W1's.
"""

from __future__ import annotations

from .. import peers, tasks
from ..core import Context, Job, Row, at_least, metric_rows, workload

WL = "W3"
TARGET = f"{__name__}:child"
TASK_S = 0.02
WORKERS = 2


def child(system: str, n: int, workers: int = WORKERS, **opts) -> dict:
    out = peers.run_map(system, tasks.sleep20, range(n), workers=workers, **opts)
    out["ideal_s"] = n * TASK_S / workers
    out["efficiency"] = 100.0 * out["ideal_s"] / out["work_s"]
    return out


@workload(WL, "efficiency: 20 ms tasks on 2 workers", quick_s=25, full_s=110)
def run(ctx: Context) -> list[Row]:
    n = ctx.size(400, 200)
    jobs = [
        Job("pipefarm", TARGET, {"system": "pipefarm", "n": n}, ctx.reps(3), 120),
        Job(
            "ProcessPool chunksize=1",
            TARGET,
            {"system": "ppe", "n": n, "chunksize": 1},
            ctx.reps(3),
            120,
        ),
        Job(
            "ProcessPool chunksize=10",
            TARGET,
            {"system": "ppe", "n": n, "chunksize": 10},
            ctx.reps(2),
            120,
        ),
        Job("joblib", TARGET, {"system": "joblib", "n": n}, ctx.reps(3), 120),
        Job("Dask", TARGET, {"system": "dask", "n": n}, ctx.reps(2), 180),
        Job("Ray", TARGET, {"system": "ray", "n": n}, ctx.reps(2), 180),
    ]
    ms = ctx.measure(j for j in jobs if ctx.wants(j.kwargs["system"]))
    note = "cluster start-up excluded"
    return metric_rows(
        WL,
        ms,
        f"efficiency (ideal {n * TASK_S / WORKERS:.0f} s / wall)",
        "%",
        "efficiency",
        targets={"pipefarm": ("≥ 98 %", at_least(98.0))},
        notes={"Dask": note, "Ray": note},
    )

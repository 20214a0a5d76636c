"""W5 memory: submit a million no-op tasks, then execute them.

Two numbers per system:

- submission rate: tasks / time of the submitting call(s) (``run.map(noop, range(N))``,
  ``[ex.submit(...)]``, ``client.map``, ``[f.remote(...)]``). Target: pipefarm ≥ 200,000 tasks/s.
- coordinator memory per pending task: (peak RSS of the submitting process from just before
  submission to the last result − its RSS just before submission) / N. The peak is the kernel's
  high-water mark (``VmHWM``, reset before submission) or a 10 ms sampling thread, whichever is
  larger. Target: pipefarm ≤ 100 bytes/task.

Every system runs in its own fresh process, so the RSS is its own. ProcessPoolExecutor gets the
same million tasks as futures; Dask and Ray get fewer (they are too slow for a million), so their
fixed costs weigh more per task: read their bytes/task as an upper bound. For Ray the driver is not the whole coordinator: a second row
adds the RSS of its raylet and GCS processes. Dask's scheduler runs inside the client process
with ``LocalCluster``, so its row includes it.
"""

from __future__ import annotations

from .. import peers, tasks
from ..core import Context, Job, Row, at_least, at_most, metric_rows, workload

WL = "W5"
TARGET = f"{__name__}:child"


def child(system: str, n: int, workers: int = 2, **opts) -> dict:
    out = peers.run_map(system, tasks.noop, range(n), workers=workers, mem=True, **opts)
    out["submit_rate"] = n / out["submit_s"] if out["submit_s"] > 0 else None
    out["bytes_per_task"] = out["rss_growth"] / n
    if "helpers_rss_growth" in out:
        out["bytes_per_task_with_helpers"] = (out["rss_growth"] + out["helpers_rss_growth"]) / n
    return out


@workload(WL, "memory: a million pending tasks", quick_s=40, full_s=240)
def run(ctx: Context) -> list[Row]:
    n = ctx.size(1_000_000, 200_000)
    n_ppe = ctx.size(1_000_000, 100_000)
    n_dask = ctx.size(20_000, 5_000)
    n_ray = ctx.size(20_000, 5_000)
    jobs = [
        Job("pipefarm", TARGET, {"system": "pipefarm", "n": n}, ctx.reps(1), 600),
        Job(
            "ProcessPool submit()",
            TARGET,
            {"system": "ppe", "n": n_ppe, "mode": "submit"},
            ctx.reps(1),
            600,
        ),
        Job("Dask", TARGET, {"system": "dask", "n": n_dask}, ctx.reps(1), 300),
        Job("Ray", TARGET, {"system": "ray", "n": n_ray}, ctx.reps(1), 300),
    ]
    ms = ctx.measure(j for j in jobs if ctx.wants(j.kwargs["system"]))
    fewer = "fewer tasks"
    rows = metric_rows(
        WL,
        ms,
        "submission rate",
        "tasks/s",
        "submit_rate",
        targets={"pipefarm": ("≥ 200,000 tasks/s", at_least(200_000))},
        notes={"Dask": fewer, "Ray": fewer},
    )
    rows += metric_rows(
        WL,
        ms,
        "coordinator RSS growth per pending task",
        "B/task",
        "bytes_per_task",
        targets={"pipefarm": ("≤ 100 B/task", at_most(100))},
        notes={"Dask": fewer + "; scheduler in-process", "Ray": fewer + "; driver only"},
    )
    if "Ray" in ms and ms["Ray"].ok:
        ray_all = metric_rows(
            WL,
            {"pipefarm": ms["pipefarm"], "Ray": ms["Ray"]},
            "coordinator RSS growth per pending task",
            "B/task",
            lambda s: s.get("bytes_per_task_with_helpers", s.get("bytes_per_task")),
            notes={"Ray": fewer + "; driver + raylet + GCS"},
        )
        rows += [r for r in ray_all if r.system == "Ray"]
    return rows

"""W1 throughput: many no-op Python tasks (``def noop(x): return x``) on 2 workers.

pipefarm runs durably (a fresh run directory in a temporary directory); its submission
(``run.map``) and execution (``run.execute``) are timed apart and together. The peers:
``ProcessPoolExecutor.map`` with chunksize 1 and 1000, joblib ``Parallel(n_jobs=2)`` (automatic
batching), Dask ``LocalCluster(n_workers=2, threads_per_worker=1)`` + ``client.map`` and Ray
``ray.remote``. Dask and Ray run fewer tasks (they manage a few thousand tasks/s) and the time to
start their cluster is left out here (the Start-up workload measures it).

The compared number is tasks/s after set-up: tasks / (submission + execution).
Targets: pipefarm ≥ 1× joblib and ≥ 100× Dask.
"""

from __future__ import annotations

from .. import peers, tasks
from ..core import Context, Job, Row, metric_rows, ratio_at_least, workload

WL = "W1"
TARGET = f"{__name__}:child"


def child(system: str, n: int, workers: int = 2, **opts) -> dict:
    return peers.run_map(system, tasks.noop, range(n), workers=workers, **opts)


def _rate(key):
    return lambda s: s["n"] / s[key] if s.get(key) else None


@workload(WL, "throughput: no-op tasks on 2 workers", quick_s=45, full_s=150)
def run(ctx: Context) -> list[Row]:
    n = ctx.size(100_000, 20_000)
    n_slow = ctx.size(10_000, 2_000)  # Dask, Ray
    jobs = [
        Job("pipefarm", TARGET, {"system": "pipefarm", "n": n}, ctx.reps(3), 240),
        Job("pipefarm Executor", TARGET, {"system": "pf-executor", "n": n}, ctx.reps(3), 240),
        Job(
            "ProcessPool chunksize=1",
            TARGET,
            {"system": "ppe", "n": n, "chunksize": 1},
            ctx.reps(1),
            300,
        ),
        Job(
            "ProcessPool chunksize=1000",
            TARGET,
            {"system": "ppe", "n": n, "chunksize": 1000},
            ctx.reps(3),
            300,
        ),
        Job("joblib", TARGET, {"system": "joblib", "n": n}, ctx.reps(3), 300),
    ]
    if ctx.wants("dask"):
        jobs.append(Job("Dask", TARGET, {"system": "dask", "n": n_slow}, ctx.reps(2), 300))
    if ctx.wants("ray"):
        jobs.append(Job("Ray", TARGET, {"system": "ray", "n": n_slow}, ctx.reps(2), 300))
    jobs = [j for j in jobs if ctx.wants(j.kwargs["system"])]
    ms = ctx.measure(jobs)

    rows = []
    pf_ms = {"pipefarm": ms["pipefarm"]}
    pf = ms["pipefarm"]
    check = None
    if pf.ok:
        bad = [s.get("succeeded") for s in pf.samples if s.get("succeeded") not in (None, s["n"])]
        if bad:
            check = f"only {bad[0]} of {pf.first('n')} tasks succeeded"
    rows += metric_rows(WL, pf_ms, "submit rate (run.map)", "tasks/s", _rate("submit_s"))
    rows += metric_rows(WL, pf_ms, "execute rate (run.execute)", "tasks/s", _rate("run_s"))
    rows += metric_rows(WL, pf_ms, "end-to-end incl. Run.create", "tasks/s", _rate("total_s"))
    slow_note = "fewer tasks; cluster start-up excluded"
    rows += metric_rows(
        WL,
        ms,
        "tasks/s (submit + execute)",
        "tasks/s",
        _rate("work_s"),
        targets={
            "joblib": ("≥ 1×", ratio_at_least(1.0)),
            "Dask": ("≥ 100×", ratio_at_least(100.0)),
        },
        notes={
            "Dask": slow_note,
            "Ray": slow_note,
            "pipefarm": check,
            "pipefarm Executor": "pf.Executor().map, in-memory store",
        },
    )
    # pipefarm's own row: met when every ratio target is met
    sub = [
        r
        for r in rows
        if r.metric == "tasks/s (submit + execute)" and r.system in ("joblib", "Dask")
    ]
    for r in rows:
        if r.system == "pipefarm" and r.metric == "tasks/s (submit + execute)":
            r.target = "≥ 1× joblib, ≥ 100× Dask"
            if r.value is None:
                r.met = False
            elif sub and all(x.met is not None for x in sub):
                r.met = all(x.met for x in sub)
    return rows

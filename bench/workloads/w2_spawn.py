"""W2 spawn throughput: 2,000 tasks of ``true`` on 2 workers.

pipefarm runs them as command tasks of a durable run (``Run.submit_cmd`` + ``execute``; output
captured, every outcome in the catalog). Peers in the same run: ``xargs -P2``, GNU
``parallel -j2``, and a Python thread pool of ``subprocess.run``. HyperQueue's ``hq`` is
reported as not available when no ``hq`` binary is on PATH (PyPI's ``hyperqueue`` has none).
Targets: pipefarm ≥ 1.0× xargs and ≥ 4× GNU parallel.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from ..core import Context, Job, Row, Unavailable, metric_rows, ratio_at_least, workload

WL = "W2"
TARGET = f"{__name__}:child"
WORKERS = 2


def _shell(cmd: str, n: int) -> float:
    t = time.perf_counter()
    subprocess.run(["bash", "-c", cmd], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def child(system: str, n: int, workers: int = WORKERS) -> dict:
    if system == "pipefarm":
        import pipefarm as pf

        with tempfile.TemporaryDirectory() as d:
            run = pf.Run.create(f"{d}/run")
            t = time.perf_counter()
            run.submit_cmd(["true"], ({"i": str(i)} for i in range(n)))
            summary = run.execute(workers=workers, progress=False)
            wall = time.perf_counter() - t
            if summary.succeeded != n:
                raise Unavailable(f"only {summary.succeeded} of {n} tasks succeeded")
    elif system == "xargs":
        wall = _shell(f"seq {n} | xargs -P{workers} -I{{}} true", n)
    elif system == "parallel":
        if not shutil.which("parallel"):
            raise Unavailable("not available: GNU parallel is not installed")
        wall = _shell(f"seq {n} | parallel --will-cite -j{workers} true", n)
    elif system == "threads":
        t = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda _: subprocess.run(["true"], check=True), range(n)))
        wall = time.perf_counter() - t
    elif system == "hq":
        if not shutil.which("hq"):
            raise Unavailable("not available: no hq binary (PyPI's hyperqueue ships none)")
        raise Unavailable("not available: hq found but not wired into this benchmark")
    else:
        raise ValueError(system)
    return {"n": n, "rate": n / wall, "wall_s": wall}


@workload(WL, "spawn throughput: `true` commands on 2 workers", quick_s=20, full_s=45)
def run(ctx: Context) -> list[Row]:
    n = ctx.size(2000, 600)
    jobs = [
        Job("pipefarm", TARGET, {"system": "pipefarm", "n": n}, ctx.reps(3), 300),
        Job("xargs -P2", TARGET, {"system": "xargs", "n": n}, ctx.reps(3), 300),
        Job("GNU parallel -j2", TARGET, {"system": "parallel", "n": n}, ctx.reps(2), 300),
        Job("threads + subprocess.run", TARGET, {"system": "threads", "n": n}, ctx.reps(3), 300),
        Job("HyperQueue hq", TARGET, {"system": "hq", "n": n}, 1, 60),
    ]
    ms = ctx.measure(jobs)
    rows = metric_rows(
        WL, ms, "commands/s", "tasks/s", "rate",
        targets={
            "xargs -P2": ("≥ 1×", ratio_at_least(1.0)),
            "GNU parallel -j2": ("≥ 4×", ratio_at_least(4.0)),
        },
        notes={"pipefarm": "durable: every outcome in the catalog, output captured"},
    )
    peers = [r for r in rows if r.system in ("xargs -P2", "GNU parallel -j2") and r.met is not None]
    for r in rows:
        if r.system == "pipefarm":
            r.target = "≥ 1× xargs, ≥ 4× GNU parallel"
            r.met = bool(peers) and all(p.met for p in peers) if r.value is not None else False
    return rows

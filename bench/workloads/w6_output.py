"""W6 output: 10,000 command tasks each printing 1 KiB, on 2 workers.

pipefarm streams every attempt's stdout and stderr into a few log files per worker and records
offsets; the row reports throughput and the number of files created under ``RUN/logs``
(target: at most 2 per worker). Peers: GNU ``parallel -j2 --files`` (one file per task) and
``xargs -P2`` writing into one shared file (no per-task capture at all).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

from ..core import Context, Job, Row, Unavailable, at_most, metric_rows, workload

WL = "W6"
TARGET = f"{__name__}:child"
WORKERS = 2
# 1 KiB of output per task (1023 characters and a newline)
PRINT = "head -c 1023 /dev/zero | tr '\\\\0' x; echo"


def _files(d: str) -> int:
    return sum(len(fs) for _, _, fs in os.walk(d))


def child(system: str, n: int, workers: int = WORKERS) -> dict:
    with tempfile.TemporaryDirectory() as d:
        if system == "pipefarm":
            import pipefarm as pf

            run = pf.Run.create(f"{d}/run")
            t = time.perf_counter()
            run.submit_cmd(["sh", "-c", PRINT], ({"i": str(i)} for i in range(n)))
            summary = run.execute(workers=workers, progress=False)
            wall = time.perf_counter() - t
            if summary.succeeded != n:
                raise Unavailable(f"only {summary.succeeded} of {n} tasks succeeded")
            logs = f"{d}/run/logs"
            files = sum(
                1 for _, _, fs in os.walk(logs) for f in fs if not f.startswith("python-")
            )
        elif system == "parallel":
            if not shutil.which("parallel"):
                raise Unavailable("not available: GNU parallel is not installed")
            out = f"{d}/out"
            os.mkdir(out)
            t = time.perf_counter()
            subprocess.run(
                ["bash", "-c", f"seq {n} | parallel --will-cite -j{workers} --files --tmpdir {out}"
                 f" sh -c {PRINT!r}"],
                check=True, stdout=subprocess.DEVNULL,
            )
            wall = time.perf_counter() - t
            files = _files(out)
        elif system == "xargs":
            t = time.perf_counter()
            subprocess.run(
                ["bash", "-c", f"seq {n} | xargs -P{workers} -I{{}} sh -c {PRINT!r} >> {d}/all.out"],
                check=True,
            )
            wall = time.perf_counter() - t
            files = 1
        else:
            raise ValueError(system)
    return {"n": n, "rate": n / wall, "files": files, "files_per_worker": files / workers}


@workload(WL, "output: 10,000 tasks printing 1 KiB each", quick_s=30, full_s=90)
def run(ctx: Context) -> list[Row]:
    n = ctx.size(10_000, 2_000)
    jobs = [
        Job("pipefarm", TARGET, {"system": "pipefarm", "n": n}, ctx.reps(2), 600),
        Job("GNU parallel -j2 --files", TARGET, {"system": "parallel", "n": n}, ctx.reps(1), 600),
        Job("xargs -P2 (one shared file)", TARGET, {"system": "xargs", "n": n}, ctx.reps(2), 600),
    ]
    ms = ctx.measure(jobs)
    rows = metric_rows(WL, ms, "tasks/s", "tasks/s", "rate",
                       notes={"pipefarm": "output captured per attempt, offsets in the catalog"})
    rows += metric_rows(
        WL, ms, "files created per worker", "files", "files_per_worker",
        targets={"pipefarm": ("≤ 2 per worker", at_most(2.0))},
    )
    for r in rows:
        if r.unit == "files":
            r.better = "lower"
    return rows

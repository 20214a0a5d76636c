"""W7 metadata load of the shared-filesystem protocol: no-op tasks through 8 local
``pipefarm worker`` processes sharing one run directory.

Two measurements. Under ``strace -f`` the workers' file-name syscalls (open, create, stat,
rename, unlink, mkdir, utime, ...) that name a path inside the run directory, plus directory
listings, are counted and divided by the number of tasks (interpreter start-up, which touches
no run-directory path, is not counted). Without strace, the same run's throughput is compared
with the local backend's on the same tasks and worker count.
Targets: at most 0.05 metadata operations per task; throughput at least half the local backend's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

from ..core import Context, Job, Row, Unavailable, at_most, metric_rows, ratio_at_least, workload

WL = "W7"
TARGET = f"{__name__}:child"
WORKERS = 8
_SYSCALL = re.compile(r"^\d+\s+(\w+)\((.*)$")


def noop(x):
    return x


def _prepare(d: str, n: int):
    import pipefarm as pf
    from pipefarm.backends.array import export

    run = pf.Run.create(f"{d}/run")
    run.map(noop, range(n))
    export(run, WORKERS)
    return run


def _workers(run_dir: str, strace_log: str | None) -> float:
    cmd = [sys.executable, "-m", "pipefarm", "worker", run_dir, "--idle-exit", "1"]
    script = " & ".join(" ".join(map(repr, cmd)) for _ in range(WORKERS)) + " & wait"
    argv = ["bash", "-c", script]
    if strace_log:
        argv = ["strace", "-f", "-qq", "-o", strace_log, "-e", "trace=%file,getdents64", *argv]
    t = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return time.perf_counter() - t


def child(system: str, n: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        if system == "pipefarm local":
            import pipefarm as pf

            run = pf.Run.create(f"{d}/run")
            run.map(noop, range(n))
            t = time.perf_counter()
            run.execute(workers=WORKERS, progress=False)
            return {"n": n, "rate": n / (time.perf_counter() - t)}
        run = _prepare(d, n)
        run_dir = str(run.path)
        if system == "pipefarm fs (strace)":
            if subprocess.run(["which", "strace"], capture_output=True).returncode:
                raise Unavailable("not available: strace is not installed")
            log = f"{d}/strace.log"
            _workers(run_dir, log)
            ops = 0
            for line in open(log, errors="replace"):
                m = _SYSCALL.match(line)
                if m and (m.group(1) == "getdents64" or run_dir in m.group(2)):
                    ops += 1
            from pipefarm.backends.array import sync

            sync(run)
            ok = run.status()["succeeded"]
            if ok != n:
                raise Unavailable(f"only {ok} of {n} tasks succeeded")
            return {"n": n, "ops_per_task": ops / n, "ops": ops}
        wall = _workers(run_dir, None)
        from pipefarm.backends.array import sync

        sync(run)
        if run.status()["succeeded"] != n:
            raise Unavailable("not every task succeeded")
        return {"n": n, "rate": n / wall}


@workload(WL, "metadata load: 8 workers on the shared-filesystem protocol", quick_s=60,
          full_s=240)
def run(ctx: Context) -> list[Row]:
    n = ctx.size(100_000, 20_000)
    ms = ctx.measure([
        Job("pipefarm fs (strace)", TARGET, {"system": "pipefarm fs (strace)", "n": n}, 1, 900),
        Job("pipefarm fs", TARGET, {"system": "pipefarm fs", "n": n}, ctx.reps(2), 600),
        Job("pipefarm local", TARGET, {"system": "pipefarm local", "n": n}, ctx.reps(2), 600),
    ])
    rows = metric_rows(WL, {"pipefarm": ms["pipefarm fs (strace)"]},
                       "run-dir metadata operations per task", "ops/task", "ops_per_task",
                       targets={"pipefarm": ("≤ 0.05", at_most(0.05))})
    rows[0].better = "lower"
    rate = {"pipefarm": ms["pipefarm fs"], "local backend, 8 workers": ms["pipefarm local"]}
    rr = metric_rows(WL, rate, "tasks/s, 8 workers (fs protocol vs local backend)", "tasks/s",
                     "rate", targets={"local backend, 8 workers": ("≥ 0.5×", ratio_at_least(0.5))})
    return rows + rr



"""W8 recovery: how long after a worker's death its block is claimed again, against the lease.

Two local ``pipefarm worker`` processes share a run with a short lease; when both hold blocks
one is killed with SIGKILL. The time from the kill to the first claim file of a later epoch
(the takeover, stamped by the filesystem) is the recovery time; the target is the lease
itself plus the survivor's heartbeat interval (lease / 4), since expiry is judged on heartbeat
mtimes, not on node clocks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

from ..core import Context, Job, Row, Unavailable, at_most, metric_rows, workload

WL = "W8"
TARGET = f"{__name__}:child"


def nap(x):
    time.sleep(0.05)
    return x


def child(lease_s: float, n: int = 400) -> dict:
    import pipefarm as pf
    from pipefarm.backends.array import export, sync

    with tempfile.TemporaryDirectory() as d:
        run = pf.Run.create(f"{d}/run")
        run.store.lease_s = lease_s
        run.map(nap, range(n))
        export(run, 2)
        claims = f"{d}/run/fs/claims"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        procs = [
            subprocess.Popen([sys.executable, "-m", "pipefarm", "worker", str(run.path),
                              "--id", f"w{i}"], env=env, stderr=subprocess.DEVNULL)
            for i in range(2)
        ]
        deadline = time.time() + 60
        while not any(open(f"{claims}/{f}").read().strip() == "w0"
                      for f in os.listdir(claims) if f.count(".") == 1):
            if time.time() > deadline:
                raise Unavailable("worker w0 never claimed a block")
            time.sleep(0.05)
        time.sleep(0.3)
        t_kill = time.time()
        procs[0].send_signal(signal.SIGKILL)
        retake = None
        deadline = time.time() + 10 * lease_s + 30
        while retake is None and time.time() < deadline:
            later = [f for f in os.listdir(claims) if f.count(".") == 1 and not f.endswith(".0")]
            if later:
                retake = min(os.stat(f"{claims}/{f}").st_mtime for f in later)
            time.sleep(0.05)
        procs[1].wait(timeout=600)
        sync(run)
        if retake is None:
            raise Unavailable("the dead worker's block was never re-claimed")
        if run.status()["succeeded"] != n:
            raise Unavailable("not every task succeeded")
        return {"lease_s": lease_s, "recovery_s": retake - t_kill,
                "ratio_to_lease": (retake - t_kill) / lease_s}


@workload(WL, "recovery: a dead worker's block re-claimed, against the lease", quick_s=30,
          full_s=60)
def run(ctx: Context) -> list[Row]:
    lease = 5.0
    ms = ctx.measure([Job("pipefarm", TARGET, {"lease_s": lease}, ctx.reps(2), 300)])
    rows = metric_rows(WL, ms, f"seconds from SIGKILL to re-claim (lease {lease:g} s)", "s",
                       "recovery_s", targets={"pipefarm": (f"≤ {lease * 1.25:g} s",
                                                           at_most(lease * 1.25))})
    rows += metric_rows(WL, ms, "recovery / lease", "×", "ratio_to_lease")
    rows[-1].better = "lower"
    return rows

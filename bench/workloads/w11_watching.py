"""W11 the cost of watching: W1's workload with the dashboard served beside the run.

Two measurements.

1. W1's no-op tasks on 2 workers, executed alone and with the dashboard attached while an
   HTTP client in another process scrapes ``/metrics`` and reads ``/api/snapshot`` once a
   second (what Prometheus and a browser tab do), in the same invocation; the dashboard as
   ``execute(dashboard=True)`` starts it (a child process at nice 10), as ``run.serve()``
   does (a child process), and, for the record, served from a thread of the run's own process
   (``observe.dashboard.start``: what ``run.serve()`` did first, 0.93x). Reported: the execute
   rate of each and watched / alone. Target: at most 2 % slower (ratio ≥ 0.98).
2. A finished 1,000,000-task run (200,000 with ``--quick``): the time of one ``/metrics``
   scrape and one ``/api/snapshot`` refresh through a freshly started server, so nothing is
   cached (the cold read: a tab opened on the run), and again once warm. Target: each cold
   one under 200 ms.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

from .. import tasks
from ..core import Context, Job, Row, at_most, metric_rows, ratio_at_least, workload

WL = "W11"
TARGET = f"{__name__}:child"
BIG = f"{__name__}:big_run"

#: the client that stands for Prometheus and a browser tab: a scrape and a refresh a second
_CLIENT = r"""
import sys, time, urllib.request
url = sys.argv[1]
while True:
    t = time.monotonic()
    for path in ("metrics", "api/snapshot"):
        try:
            urllib.request.urlopen(url + path, timeout=10).read()
        except Exception:
            pass
    time.sleep(max(0.0, 1.0 - (time.monotonic() - t)))
"""


def child(system: str, n: int, workers: int = 2) -> dict:
    import pipefarm as pf

    tmp = tempfile.mkdtemp(prefix="pfbench-")
    dash = client = None
    try:
        run = pf.Run.create(os.path.join(tmp, "run"))
        run.map(tasks.noop, range(n))
        if system == "serve":
            dash = run.serve(port=0)
        elif system == "thread":  # served from this process (observe.dashboard.start)
            from pipefarm.observe.dashboard import start

            dash = start(run.path, port=0)
        elif system == "process":  # what execute(dashboard=True) starts
            from pipefarm.observe.dashboard import start_process

            dash = start_process(run.path, port=0)
        if dash is not None:
            client = subprocess.Popen([sys.executable, "-c", _CLIENT, dash.url],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            urllib.request.urlopen(dash.url + "metrics", timeout=30).read()  # it is up
        t = time.perf_counter()
        run.execute(workers=workers, progress=False)
        run_s = time.perf_counter() - t
        ok = run.status()["succeeded"]
        return {"n": n, "run_s": run_s, "succeeded": ok}
    finally:
        if client is not None:
            client.kill()
            client.wait()
        if dash is not None:
            dash.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _get_s(url: str) -> float:
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as r:
        r.read()
    return time.perf_counter() - t


def big_run(n: int, repeats: int = 3) -> dict:
    """Build a finished ``n``-task run (``run.map`` + ``run.execute`` of no-ops),
    then time cold and warm reads through fresh servers."""
    import pipefarm as pf

    tmp = tempfile.mkdtemp(prefix="pfbench-")
    try:
        run = pf.Run.create(os.path.join(tmp, "run"))
        t = time.perf_counter()
        run.map(tasks.noop, range(n))
        run.execute(workers=2, progress=False)
        build_s = time.perf_counter() - t
        # finished as `pipefarm run` leaves it: its writer closed (the WAL checkpointed; an
        # open writer's WAL of a 1M-task run holds ~170 MB that every read goes through)
        run.close()
        run = pf.Run.open(os.path.join(tmp, "run"), readonly=True)
        out: dict = {"n": n, "build_s": build_s, "scrape_cold_s": [], "refresh_cold_s": [],
                     "scrape_warm_s": [], "refresh_warm_s": []}
        # the first view of the idle run builds the views' index (store/sqlite/schema.py):
        # reported on its own, the cold reads below are of fresh servers after it
        with run.serve(port=0) as d:
            out["first_view_s"] = _get_s(d.url + "api/snapshot")
        for _ in range(repeats):
            with run.serve(port=0) as d:  # a fresh server: nothing cached
                out["scrape_cold_s"].append(_get_s(d.url + "metrics"))
            with run.serve(port=0) as d:
                out["refresh_cold_s"].append(_get_s(d.url + "api/snapshot"))
                time.sleep(1.1)  # past the refresh interval: the unchanged catalog is reused
                out["refresh_warm_s"].append(_get_s(d.url + "api/snapshot"))
                _get_s(d.url + "metrics")
                time.sleep(1.1)
                out["scrape_warm_s"].append(_get_s(d.url + "metrics"))
        for k in ("scrape_cold_s", "refresh_cold_s", "scrape_warm_s", "refresh_warm_s"):
            out[k] = sorted(out[k])[len(out[k]) // 2]
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rate(s: dict) -> float | None:
    return s["n"] / s["run_s"] if s.get("run_s") else None


@workload(WL, "cost of watching: W1 with serve + a scrape a second; reads of a 1M-task run",
          quick_s=110, full_s=300)
def run(ctx: Context) -> list[Row]:
    n = ctx.size(100_000, 20_000)
    big = ctx.size(1_000_000, 200_000)
    reps = ctx.reps(5, 3)
    ms = ctx.measure([
        Job("W1 alone", TARGET, {"system": "alone", "n": n}, reps, 240),
        Job("W1 + execute(dashboard=True)", TARGET, {"system": "process", "n": n}, reps, 240),
        Job("W1 + run.serve()", TARGET, {"system": "serve", "n": n}, reps, 240),
        Job("W1 + a server thread in the run's process", TARGET, {"system": "thread", "n": n},
            reps, 240),
    ])
    rows = []
    where = {"W1 + execute(dashboard=True)": "server in a child process at nice 10",
             "W1 + run.serve()": "server in a child process",
             "W1 + a server thread in the run's process": "observe.dashboard.start"}
    for watched, note in where.items():
        part = {"W1 alone": ms["W1 alone"], watched: ms[watched]}
        rows += metric_rows(
            WL, part, "execute rate, watched vs alone", "tasks/s", _rate, ref=watched,
            targets={"W1 alone": ("≥ 0.98× (≤ 2 % slower)", ratio_at_least(0.98))},
            notes={watched: note + "; /metrics and /api/snapshot read every second"},
        )
    bm = ctx.measure([Job("pipefarm", BIG, {"n": big}, 1, 600)])
    for key, what in (("first_view_s", "first view of the finished run (builds the views' index)"),
                      ("scrape_cold_s", "/metrics scrape, finished run, cold"),
                      ("refresh_cold_s", "/api/snapshot refresh, finished run, cold"),
                      ("scrape_warm_s", "/metrics scrape, finished run, warm"),
                      ("refresh_warm_s", "/api/snapshot refresh, finished run, warm")):
        cold = "cold" in key
        target = {"targets": {"pipefarm": ("< 200 ms", at_most(0.2))}} if cold else {}
        rows += metric_rows(WL, bm, what, "s", key, **target)
    return rows

"""Import time: ``import pipefarm`` in a fresh interpreter, against the peers' imports.

Wall-clock of ``python -c 'import X'`` minus ``python -c pass``, the two alternated, median of
the repeats (7, or 3 with ``--quick``). For pipefarm a second row gives the cumulative time that
``python -X importtime`` reports for the package itself, and a third the time until
``pipefarm.Run`` is loaded (pipefarm imports its names lazily). Target: pipefarm < 100 ms.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

from ..core import Context, Job, Row, metric_rows, workload

WL = "import"
TARGET = f"{__name__}:child"

MODULES = {
    "pipefarm": "pipefarm",
    "concurrent.futures": "concurrent.futures",
    "joblib": "joblib",
    "Dask": "distributed",
    "Ray": "ray",
}
WITH_RUN = "pipefarm + pf.Run"
SYSTEM = {
    "pipefarm": "pipefarm",
    "concurrent.futures": "ppe",
    "joblib": "joblib",
    "Dask": "dask",
    "Ray": "ray",
}


def _time(code: str) -> float:
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        env=os.environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    return time.perf_counter() - t


def _importtime(module: str) -> float | None:
    """Cumulative seconds ``-X importtime`` reports for ``module`` itself."""
    p = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        check=True,
    )
    for line in p.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[2].strip() == module:
            return int(parts[1].strip()) / 1e6
    return None


def child(module: str, repeats: int = 7, also: str = "") -> dict:
    """Import time of ``module``; ``also``: code to run after the import, timed with it."""
    if module == "pipefarm":  # fail as "not available" rather than time an empty package
        import pipefarm

        if not hasattr(pipefarm, "Run"):
            raise ImportError("pipefarm core not written yet (no pipefarm.Run)")
    else:
        __import__(module)  # not installed: report it, not a CalledProcessError
    code = f"import {module}" + (f"; {also}" if also else "")
    _time(code)  # warm the file cache and the bytecode cache
    diffs, base, full = [], [], []
    for _ in range(repeats):
        b = _time("pass")
        f = _time(code)
        base.append(b)
        full.append(f)
        diffs.append(f - b)
    it = []
    if not also:
        it = [x for x in (_importtime(module) for _ in range(min(repeats, 3))) if x is not None]
    return {
        "import_s": statistics.median(diffs),
        "diffs": diffs,
        "python_s": statistics.median(base),
        "importtime_s": statistics.median(it) if it else None,
    }


@workload(WL, "import time in a fresh interpreter", quick_s=15, full_s=30)
def run(ctx: Context) -> list[Row]:
    reps = ctx.reps(7, 3)
    jobs = [
        Job(label, TARGET, {"module": mod, "repeats": reps}, 1, 180)
        for label, mod in MODULES.items()
        if ctx.wants(SYSTEM[label])
    ]
    # pipefarm's names are lazy: what it costs until the API is usable
    jobs.insert(
        1,
        Job(
            WITH_RUN,
            TARGET,
            {"module": "pipefarm", "repeats": reps, "also": "pipefarm.Run"},
            1,
            180,
        ),
    )
    ms = ctx.measure(jobs)
    with_run = ms.pop(WITH_RUN)
    rows = metric_rows(
        WL,
        ms,
        "import time (wall, minus python -c pass)",
        "s",
        "import_s",
        targets={"pipefarm": ("< 100 ms", lambda v, r: None if v is None else v < 0.1)},
        notes={"Dask": "import distributed"},
    )
    rows += metric_rows(
        WL,
        {"pipefarm": ms["pipefarm"]},
        "import time (-X importtime, cumulative)",
        "s",
        "importtime_s",
    )
    rows += metric_rows(
        WL,
        {WITH_RUN: with_run},
        "import time (wall, minus python -c pass)",
        "s",
        "import_s",
        ref=WITH_RUN,
        notes={WITH_RUN: "import pipefarm; pipefarm.Run (the lazy names loaded)"},
    )
    return rows

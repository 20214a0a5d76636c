"""W12 engines: pipefarm on each engine against the engine's own API, same tasks, same workers.

For each engine, two sides run the same three measurements on the same workers:

- **W1**: 20,000 / 5,000 no-op tasks; tasks/s = tasks / (first submission to last result).
  pipefarm is durable (a fresh run directory, every result in its catalog); the engines keep
  results in memory only.
- **W3**: 400 / 200 tasks of ``time.sleep(0.02)``; efficiency = ideal (tasks × 20 ms / 2) ÷ wall,
  wall from the first submission to the last result.
- **start-up**: from the call that starts the work to the first task running (4 tasks that stamp
  their start time; see :func:`bench.tasks.stamp`), with the engine already up on both sides.

Engines and sides:

- ``mpi``: ``mpiexec -n 3`` (rank 0 + 2 worker ranks), one job per measurement. pipefarm:
  ``run.execute(backend=MPIBackend())``; the engine: ``mpi4py.futures.MPICommExecutor`` on the
  same 3 ranks, ``map`` with chunksize ⌈n/8⌉ (start-up: chunksize 1). Clock from the call on
  rank 0 (executor creation included); the job's launch is left out on both sides.
- ``dask``: a ``LocalCluster`` of 2 single-threaded worker processes; pipefarm
  ``backend=Dask(client=client)`` against ``client.map`` + ``client.gather``.
- ``ray``: ``ray.init(num_cpus=2)``; pipefarm ``backend="ray"`` against remote functions
  (``ray.get([f.remote(x) ...])``).

Each side runs in a fresh child process (one engine per child; the three measurements share it,
except under MPI where a backend serves one ``execute``). Targets: W1 pipefarm ≥ 1× mpi4py,
≥ 20× Dask, ≥ 10× Ray; W3 ≥ 97 % on every engine.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from .. import tasks
from ..core import (
    Context,
    Job,
    Row,
    Unavailable,
    at_least,
    child_env,
    metric_rows,
    ratio_at_least,
    workload,
)

WL = "W12"
TARGET = f"{__name__}:child"
WORKERS = 2
TASK_S = 0.02  # W3's sleep
N_STAMPS = 4  # start-up: tasks that stamp their start time
#: W1's speed-up targets (pipefarm / engine), from the issue.
W1_TARGETS = {"mpi": 1.0, "dask": 20.0, "ray": 10.0}
W3_TARGET = 97.0
#: The mpi4py.futures chunksize: n / 8 (4 chunks per worker rank) keeps both ranks busy to the
#: end; larger chunks leave one rank idle at the tail, smaller ones pay more messages.
MPI_CHUNKS = 8

PF_LABEL = {"mpi": "pipefarm on MPI", "dask": "pipefarm on Dask", "ray": "pipefarm on Ray"}
ENGINE_LABEL = {
    "mpi": "mpi4py.futures MPICommExecutor",
    "dask": "Dask client.map",
    "ray": "Ray remote functions",
}


# --- one measurement: run ``fn`` over ``args`` on one side ------------------------------------


def _pf_run(fn: Callable, args: Sequence, make_backend: Callable[[], Any]) -> dict:
    """pipefarm, durable: a fresh run; the clock starts at ``run.map`` (creation excluded)."""
    import pipefarm as pf

    tmp = tempfile.mkdtemp(prefix="pfbench-eng-")
    try:
        run = pf.Run.create(os.path.join(tmp, "run"))
        t_submit = time.time()
        run.map(fn, args)
        backend = make_backend()
        t_call = time.time()
        summary = run.execute(backend=backend, progress=False)
        t_done = time.time()
        ok = summary.succeeded if hasattr(summary, "succeeded") else None
        if ok is not None and ok != len(args):
            raise RuntimeError(f"only {ok} of {len(args)} tasks succeeded: {summary!r}")
        run.close()
        return {"t_submit": t_submit, "t_call": t_call, "t_done": t_done, "n": len(args)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _timed(n: int, call: Callable[[], int]) -> dict:
    """An engine's side: ``call()`` submits and waits for every result (returns how many)."""
    t0 = time.time()
    got = call()
    t_done = time.time()
    if got != n:
        raise RuntimeError(f"{got} of {n} results came back")
    return {"t_submit": t0, "t_call": t0, "t_done": t_done, "n": n}


def _three(run_tasks: Callable[[Callable, Sequence, int], dict], n1: int, n3: int) -> dict:
    """Start-up, W1 and W3 on one side; ``run_tasks(fn, args, chunksize)`` times one map."""
    out: dict[str, Any] = {}
    fd, path = tempfile.mkstemp(prefix="pfbench-stamps-")
    os.close(fd)
    try:
        r = run_tasks(tasks.stamp, [path] * N_STAMPS, 1)
        stamps = tasks.read_stamps(path)
    finally:
        os.unlink(path)
    if not stamps:
        raise RuntimeError("no task wrote its start time")
    out["startup_s"] = min(stamps) - r["t_call"]
    out["n_stamps"] = N_STAMPS
    out.update(_w1(run_tasks(tasks.noop, range(n1), max(1, math.ceil(n1 / MPI_CHUNKS)))))
    out.update(_w3(run_tasks(tasks.sleep20, range(n3), max(1, math.ceil(n3 / MPI_CHUNKS)))))
    return out


def _w1(r: dict) -> dict:
    return {"n": r["n"], "w1_s": r["t_done"] - r["t_submit"],
            "w1_rate": r["n"] / (r["t_done"] - r["t_submit"])}


def _w3(r: dict) -> dict:
    ideal = r["n"] * TASK_S / WORKERS
    wall = r["t_done"] - r["t_submit"]
    return {"n3": r["n"], "w3_s": wall, "w3_eff": 100.0 * ideal / wall}


# --- dask ----------------------------------------------------------------------------------------


def _dask(side: str, n1: int, n3: int) -> dict:
    import logging

    from distributed import Client, LocalCluster

    t0 = time.time()
    cluster = LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=logging.ERROR)
    client = Client(cluster)
    client.wait_for_workers(WORKERS)
    up_s = time.time() - t0
    try:
        if side == "pipefarm":
            from pipefarm.backends.dask import DaskBackend

            def run_tasks(fn, args, _chunk):
                return _pf_run(fn, args, lambda: DaskBackend(WORKERS, client=client))
        else:

            def run_tasks(fn, args, _chunk):
                return _timed(len(args), lambda: len(client.gather(
                    client.map(fn, list(args), pure=False))))

        out = _three(run_tasks, n1, n3)
    finally:
        client.close()
        cluster.close()
    out["engine_up_s"] = up_s
    return out


# --- ray -----------------------------------------------------------------------------------------


def _ray(side: str, n1: int, n3: int) -> dict:
    if side == "pipefarm":
        try:
            from pipefarm.backends.ray import RayBackend  # noqa: F401
        except ImportError as e:
            raise Unavailable(f"pipefarm.backends.ray not written yet ({e})") from None
    import ray

    from ..peers import RAY_OBJECT_STORE

    t0 = time.time()
    ray.init(num_cpus=WORKERS, include_dashboard=False, object_store_memory=RAY_OBJECT_STORE,
             log_to_driver=False, configure_logging=True, logging_level="error")
    up_s = time.time() - t0
    try:
        if side == "pipefarm":

            def run_tasks(fn, args, _chunk):
                # leaves out address=: runs on the Ray this process is connected to
                return _pf_run(fn, args, lambda: RayBackend(WORKERS))
        else:

            def run_tasks(fn, args, _chunk):
                remote = ray.remote(fn)
                return _timed(len(args), lambda: len(ray.get([remote.remote(a) for a in args])))

        out = _three(run_tasks, n1, n3)
    finally:
        ray.shutdown()
    out["engine_up_s"] = up_s
    return out


# --- mpi: one mpiexec job per measurement ----------------------------------------------------------

_MPI_ENV = {  # Open MPI as root (CI containers) and more ranks than cores; MPICH ignores them
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
}
_WHAT = {"stamp": tasks.stamp, "noop": tasks.noop, "sleep20": tasks.sleep20}


def _mpi(side: str, n1: int, n3: int) -> dict:
    exe = shutil.which("mpiexec")
    if exe is None:
        raise Unavailable("no mpiexec on PATH")
    try:
        import mpi4py  # noqa: F401  (not initialised: only the jobs' ranks use MPI)
    except ImportError as e:
        raise Unavailable(f"mpi4py is not installed ({e})") from None
    env = {**child_env(), **_MPI_ENV}
    up: list[float] = []

    def run_tasks(fn, args, chunk):
        what = next(k for k, f in _WHAT.items() if f is fn)
        arg = args[0] if what == "stamp" else len(args)
        with tempfile.TemporaryDirectory(prefix="pfbench-mpi-") as tmp:
            out = os.path.join(tmp, "out.json")
            t0 = time.time()
            proc = subprocess.run(
                [exe, "-n", str(WORKERS + 1), sys.executable, "-m", __name__, out, side, what,
                 json.dumps(arg), str(chunk)],
                env=env, capture_output=True, text=True, timeout=240)
            if proc.returncode != 0 or not os.path.exists(out):
                raise RuntimeError(f"mpiexec exited {proc.returncode}: {proc.stderr[-2000:]}")
            with open(out) as f:
                r = json.load(f)
            up.append(r["t_main"] - t0)
            return r

    res = _three(run_tasks, n1, n3)
    res["engine_up_s"] = min(up)  # mpiexec's launch to rank 0's first line
    return res


def _mpi_rank_main(out: str, side: str, what: str, arg_json: str, chunk: str) -> None:
    """Every rank of one ``mpiexec`` job; rank 0 writes the timing to ``out``."""
    t_main = time.time()
    # MPI is initialised before the clock on both sides (~0.25 s here): the engine side needs it
    # to exist, and a pipefarm script under mpiexec has usually made its backend at the start
    from mpi4py import MPI

    fn = _WHAT[what]
    arg = json.loads(arg_json)
    args: Sequence = [arg] * N_STAMPS if what == "stamp" else range(arg)
    if side == "pipefarm":
        from pipefarm.backends.mpi import MPIBackend, serve_if_worker_rank

        serve_if_worker_rank()  # ranks 1..N-1 serve rank 0's workers, then exit here
        r = _pf_run(fn, args, lambda: MPIBackend(comm=MPI.COMM_WORLD))
    else:
        from mpi4py.futures import MPICommExecutor

        def call() -> int:
            with MPICommExecutor(MPI.COMM_WORLD, root=0) as ex:
                return sum(1 for _ in ex.map(fn, args, chunksize=int(chunk)))

        if MPI.COMM_WORLD.Get_rank() != 0:
            with MPICommExecutor(MPI.COMM_WORLD, root=0):
                pass  # serves rank 0's tasks until it is done
            return
        r = _timed(len(args), call)
    r["t_main"] = t_main
    with open(out, "w") as f:
        json.dump(r, f)


# --- the harness side ----------------------------------------------------------------------------

_ENGINES = {"mpi": _mpi, "dask": _dask, "ray": _ray}


def child(engine: str, side: str, n1: int, n3: int) -> dict:
    """One side (``"pipefarm"`` or ``"engine"``) of one engine: start-up, W1 and W3."""
    return _ENGINES[engine](side, n1, n3)


@workload(WL, "engines: pipefarm on MPI, Dask, Ray vs their own APIs", quick_s=50, full_s=150)
def run(ctx: Context) -> list[Row]:
    n1 = ctx.size(20_000, 5_000)
    n3 = ctx.size(400, 200)
    rows: list[Row] = []
    reps = {"mpi": (ctx.reps(3), ctx.reps(3)), "dask": (ctx.reps(2), ctx.reps(1)),
            "ray": (ctx.reps(1), ctx.reps(1))}
    for engine in ("mpi", "dask", "ray"):
        if not ctx.wants(engine) and engine != "mpi":
            continue
        pf, eng = PF_LABEL[engine], ENGINE_LABEL[engine]
        if engine == "mpi":
            eng += f" (chunksize {math.ceil(n1 / MPI_CHUNKS):,})"
        kw = {"engine": engine, "n1": n1, "n3": n3}
        ms = ctx.measure([
            Job(pf, TARGET, {**kw, "side": "pipefarm"}, reps[engine][0], 300),
            Job(eng, TARGET, {**kw, "side": "engine"}, reps[engine][1], 300),
        ])
        rows += metric_rows(
            WL, ms, f"W1 {n1:,} no-ops: tasks/s", "tasks/s", "w1_rate", ref=pf,
            targets={eng: (f"≥ {W1_TARGETS[engine]:g}×", ratio_at_least(W1_TARGETS[engine]))},
            notes={pf: "durable"})
        rows += metric_rows(
            WL, ms, f"W3 {n3} × 20 ms: efficiency", "%", "w3_eff", ref=pf, n_key="n3",
            targets={pf: (f"≥ {W3_TARGET:g} %", at_least(W3_TARGET))})
        rows += metric_rows(
            WL, ms, "start-up to first task (engine up)", "s", "startup_s", ref=pf,
            n_key="n_stamps",
            notes={pf: "from run.execute()", eng: _START_NOTE[engine]})
    return rows


_START_NOTE = {
    "mpi": "from MPICommExecutor()",
    "dask": "from client.map()",
    "ray": "from f.remote()",
}


if __name__ == "__main__":  # a rank of one of _mpi's jobs
    _mpi_rank_main(*sys.argv[1:])

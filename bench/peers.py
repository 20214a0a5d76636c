"""Run one batch of tasks on one system, inside a benchmark child process.

Every function here runs in a fresh ``python -m bench.child`` process (see :mod:`bench.core`), so
each system starts cold, and whatever it leaves behind dies with the child's session.

:func:`run_map` is the one entry point: it maps ``fn`` over ``args`` on ``system`` with
``workers`` workers and returns the wall-clock timestamps of each phase:

``t0``          before the system is set up (pool/cluster constructor, ``Run.create``)
``t_ready``     the system is set up (for Dask/Ray: the cluster is up)
``t_submitted`` every task is submitted (``run.map`` returned, futures created)
``t_done``      every result is back (``run.execute`` returned, futures gathered)

and, derived from them, ``setup_s``, ``submit_s``, ``run_s`` (submitted to done), ``work_s``
(``submit_s + run_s``: everything after set-up) and ``total_s`` (everything).
With ``mem=True`` it also reports the coordinator's RSS before submission and its peak until done.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

SYSTEMS = ("pipefarm", "pf-executor", "ppe", "joblib", "dask", "ray")

#: Ray's object store for the benchmarks: small, the tasks pass tiny objects (Ray's minimum is 75 MiB).
RAY_OBJECT_STORE = 100 * 1024 * 1024


# --- memory ---------------------------------------------------------------------------------------


def _proc_status(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class RSSWatch:
    """The peak RSS of this process (and optionally of some helper processes) from ``start()``.

    Two sources, the larger wins: a sampling thread (every ``interval`` s) and, on Linux, the
    kernel's own high-water mark ``VmHWM``, which ``start()`` resets through
    ``/proc/self/clear_refs`` so that it covers exactly the measured interval.
    """

    def __init__(self, interval: float = 0.01, helpers: Callable[[], list] | None = None):
        self.interval = interval
        self.helpers = helpers  # returns psutil.Process objects whose RSS is added ("+helpers")
        self.baseline = 0
        self.peak_sampled = 0
        self.helpers_baseline = 0
        self.helpers_peak = 0
        self.hwm_reset = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples = 0

    def _helpers_rss(self) -> int:
        total = 0
        for p in self.helpers() if self.helpers else []:
            try:
                total += p.memory_info().rss
            except Exception:
                pass
        return total

    def start(self) -> RSSWatch:
        import psutil

        self._proc = psutil.Process()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.baseline = self._proc.memory_info().rss
        self.peak_sampled = self.baseline
        if self.helpers:
            self.helpers_baseline = self.helpers_peak = self._helpers_rss()
        self._thread = threading.Thread(target=self._loop, name="rsswatch", daemon=True)
        self._thread.start()
        return self

    def sample(self, *_a: Any, **_k: Any) -> None:
        """Take one sample now (also usable as a progress callback)."""
        try:
            rss = self._proc.memory_info().rss
        except Exception:
            return
        self.samples += 1
        if rss > self.peak_sampled:
            self.peak_sampled = rss

    def _loop(self) -> None:
        tick = 0
        while not self._stop.wait(self.interval):
            self.sample()
            tick += 1
            if self.helpers and tick % 10 == 0:
                h = self._helpers_rss()
                if h > self.helpers_peak:
                    self.helpers_peak = h

    def stop(self) -> dict:
        self.sample()
        self._stop.set()
        if self._thread:
            self._thread.join()
        hwm = _proc_status("VmHWM") if self.hwm_reset else None
        peak = max(self.peak_sampled, hwm or 0)
        out = {
            "rss_baseline": self.baseline,
            "rss_peak": peak,
            "rss_peak_sampled": self.peak_sampled,
            "rss_hwm": hwm,
            "rss_growth": peak - self.baseline,
            "rss_samples": self.samples,
        }
        if self.helpers:
            h = self._helpers_rss()
            self.helpers_peak = max(self.helpers_peak, h)
            out["helpers_rss_baseline"] = self.helpers_baseline
            out["helpers_rss_peak"] = self.helpers_peak
            out["helpers_rss_growth"] = self.helpers_peak - self.helpers_baseline
        return out


# --- the systems ----------------------------------------------------------------------------------


def _result(t0, t_ready, t_submitted, t_done, n, **extra) -> dict:
    out = {
        "n": n,
        "t0": t0,
        "t_ready": t_ready,
        "t_submitted": t_submitted,
        "t_done": t_done,
        "setup_s": t_ready - t0,
        "submit_s": t_submitted - t_ready,
        "run_s": t_done - t_submitted,
        "work_s": t_done - t_ready,
        "total_s": t_done - t0,
    }
    out.update(extra)
    return out


def _pipefarm(fn, args, workers, mem, opts):
    import pipefarm as pf

    if not hasattr(pf, "Run"):
        raise ImportError(f"pipefarm core not written yet (no pipefarm.Run in {pf.__file__})")
    tmp = tempfile.mkdtemp(prefix="pfbench-")
    try:
        watch = None
        t0 = time.time()
        run = pf.Run.create(os.path.join(tmp, "run"))
        t_ready = time.time()
        if mem:
            watch = RSSWatch().start()
        ids = run.map(fn, args)
        t_submitted = time.time()
        kw: dict[str, Any] = {"workers": workers, "progress": False}
        if watch is not None:
            kw["on_progress"] = watch.sample
        summary = run.execute(**kw)
        t_done = time.time()
        extra: dict[str, Any] = {"t_execute_call": t_submitted}
        if watch is not None:
            extra.update(watch.stop())
        del ids
        extra["summary"] = repr(summary)[:300]
        try:
            status = dict(pf.Run.open(os.path.join(tmp, "run")).status())
            extra["status"] = {k: v for k, v in status.items() if isinstance(v, int | float)}
            extra["succeeded"] = status.get("succeeded")
        except Exception as e:  # the check is informative only
            extra["status_error"] = repr(e)
        return _result(t0, t_ready, t_submitted, t_done, len(args), **extra)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pf_executor(fn, args, workers, mem, opts):
    """``pf.Executor``: pipefarm's concurrent.futures face (in-memory store by default)."""
    import pipefarm as pf

    if not hasattr(pf, "Executor"):
        raise ImportError("pipefarm core not written yet (no pipefarm.Executor)")
    watch = None
    t0 = time.time()
    ex = pf.Executor(max_workers=workers)
    try:
        t_ready = time.time()
        if mem:
            watch = RSSWatch().start()
        it = ex.map(fn, args)  # concurrent.futures' map: one future per task, submitted eagerly
        t_submitted = time.time()
        n = sum(1 for _ in it)
        t_done = time.time()
        extra = watch.stop() if watch else {}
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
    return _result(t0, t_ready, t_submitted, t_done, n, **extra)


def _ppe(fn, args, workers, mem, opts):
    from concurrent.futures import ProcessPoolExecutor

    chunksize = opts.get("chunksize", 1)
    mode = opts.get("mode", "map")
    watch = None
    t0 = time.time()
    ex = ProcessPoolExecutor(max_workers=workers)
    try:
        t_ready = time.time()
        if mem:
            watch = RSSWatch().start()
        if mode == "submit":
            futs = [ex.submit(fn, a) for a in args]
            t_submitted = time.time()
            for f in futs:
                f.result()
            n = len(futs)
            del futs
        else:
            it = ex.map(fn, args, chunksize=chunksize)  # submits every chunk eagerly
            t_submitted = time.time()
            n = sum(1 for _ in it)
        t_done = time.time()
        extra = watch.stop() if watch else {}
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
    return _result(t0, t_ready, t_submitted, t_done, n, chunksize=chunksize, mode=mode, **extra)


def _joblib(fn, args, workers, mem, opts):
    from joblib import Parallel, delayed

    watch = None
    t0 = time.time()
    par = Parallel(n_jobs=workers, batch_size=opts.get("batch_size", "auto"))
    t_ready = time.time()
    if mem:
        watch = RSSWatch().start()
    out = par(delayed(fn)(a) for a in args)  # submission and execution interleave
    t_done = time.time()
    extra = watch.stop() if watch else {}
    try:  # loky keeps its workers for the next call: stop them now
        from joblib.externals.loky import reusable_executor

        if reusable_executor._executor is not None:
            reusable_executor._executor.shutdown(wait=True)
    except Exception:
        pass
    return _result(t0, t_ready, t_ready, t_done, len(out), **extra)


def _dask(fn, args, workers, mem, opts):
    import logging

    from distributed import Client, LocalCluster

    watch = None
    t0 = time.time()
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    client = Client(cluster)
    try:
        t_ready = time.time()
        if mem:
            watch = RSSWatch().start()
        futs = client.map(fn, list(args), pure=False)
        t_submitted = time.time()
        n = len(client.gather(futs))
        t_done = time.time()
        extra = watch.stop() if watch else {}
        del futs
    finally:
        client.close()
        cluster.close()
    return _result(t0, t_ready, t_submitted, t_done, n, **extra)


def _ray_helpers():
    """Ray's own system processes started by this driver (raylet, GCS, ...), not its workers."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            name = p.name()
            cmd = " ".join(p.cmdline()[:3])
        except Exception:
            continue
        if "default_worker" in cmd or name.startswith("ray::"):
            continue
        out.append(p)
    return out


def _ray(fn, args, workers, mem, opts):
    import ray

    watch = None
    t0 = time.time()
    ray.init(
        num_cpus=workers,
        include_dashboard=False,
        object_store_memory=RAY_OBJECT_STORE,
        log_to_driver=False,
        configure_logging=True,
        logging_level="error",
    )
    try:
        remote = ray.remote(fn)
        t_ready = time.time()
        if mem:
            watch = RSSWatch(helpers=_ray_helpers).start()
        refs = [remote.remote(a) for a in args]
        t_submitted = time.time()
        n = len(ray.get(refs))
        t_done = time.time()
        extra = watch.stop() if watch else {}
        del refs
    finally:
        ray.shutdown()
    return _result(t0, t_ready, t_submitted, t_done, n, **extra)


_IMPL = {
    "pipefarm": _pipefarm,
    "pf-executor": _pf_executor,
    "ppe": _ppe,
    "joblib": _joblib,
    "dask": _dask,
    "ray": _ray,
}


def run_map(
    system: str,
    fn: Callable,
    args: Sequence,
    *,
    workers: int = 2,
    mem: bool = False,
    **opts: Any,
) -> dict:
    """Map ``fn`` over ``args`` on ``system``; return the phase timestamps (see module doc)."""
    try:
        impl = _IMPL[system]
    except KeyError:
        raise ValueError(f"unknown system {system!r}; known: {', '.join(SYSTEMS)}") from None
    return impl(fn, args, workers, mem, opts)

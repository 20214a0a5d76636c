"""Prometheus metrics of runs, read from the catalog at scrape time (``pipefarm serve``'s
``/metrics``).

As Dask's scheduler does, nothing is counted while the run goes: a custom collector turns what
the catalog holds into metric families when Prometheus scrapes, on a fresh
:class:`~prometheus_client.CollectorRegistry` (never the process-global one, so a notebook that
serves two runs, or an application with its own metrics, gets no clash). Every family is
labelled by ``run``:

=========================================  =========  =========================================
``pipefarm_tasks{state}``                  gauge      tasks in each state
``pipefarm_attempts_total{outcome}``       counter    attempts that ended, by outcome
``pipefarm_task_duration_seconds``         histogram  durations of succeeded attempts
``pipefarm_workers{state}``                gauge      workers alive, stale, gone
``pipefarm_heartbeat_age_seconds{worker}`` gauge      seconds since each live worker's heartbeat
``pipefarm_throughput_tasks_per_second``   gauge      tasks ended per second, last minute
=========================================  =========  =========================================

``prometheus_client`` is imported only by :func:`render` and :class:`RunCollector.collect`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..states import Outcome, State
from ..store.sqlite.query import CatalogQuery

#: the duration histogram's upper edges, in seconds: from a no-op Python task (~1 ms, W1) to a
#: day-long simulation; fixed so that series from different scrapes and runs add up
DURATION_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0,
)

#: the worker states ``pipefarm_workers`` always reports (zeros included)
WORKER_STATES = ("alive", "stale", "gone")

#: every metric name ``/metrics`` exports (sample names, as a scraper sees them)
EXPORTED = (
    "pipefarm_tasks", "pipefarm_attempts_total", "pipefarm_task_duration_seconds_bucket",
    "pipefarm_task_duration_seconds_sum", "pipefarm_task_duration_seconds_count",
    "pipefarm_workers", "pipefarm_heartbeat_age_seconds", "pipefarm_throughput_tasks_per_second",
)


def metric_data(run_dir: str | os.PathLike[str], payload: dict[str, Any] | None = None,
                durations: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the metrics of one run are made of, as a JSON-ready dict. ``payload``: the
    dashboard's snapshot of the run (its overview, attempts and workers), so that a scrape and
    a page refresh share one read, and ``durations`` a :func:`duration_data` already read;
    what is not given is read here."""
    if payload is None:
        from . import snapshot as snap
        from .dashboard.board import _jsonable

        payload = {"overview": _jsonable(snap.overview(run_dir)),
                   "attempts": snap.attempt_totals(run_dir),
                   "workers": _jsonable(snap.workers(run_dir))}
    return {
        "counts": dict(payload["overview"]["counts"]),
        "throughput_per_s": payload["overview"]["throughput_per_s"],
        "attempts": dict(payload["attempts"]),
        "workers": [{"id": w["id"], "state": w["state"], "heartbeat_age_s": w["heartbeat_age_s"]}
                    for w in payload["workers"]],
        "durations": durations if durations is not None else duration_data(run_dir),
    }


def duration_data(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The duration histogram of succeeded attempts with :data:`DURATION_BUCKETS`."""
    from .snapshot import cached

    def read() -> list[Any]:
        with CatalogQuery.open(run_dir) as q:
            return list(q.duration_histogram(DURATION_BUCKETS))

    # a full scan of the succeeded tasks: kept with the idle run, so a fresh server skips it
    cum, count, total = cached(Path(run_dir), f"duration_histogram{list(DURATION_BUCKETS)}",
                               read, keep=True)
    return {"edges": list(DURATION_BUCKETS), "cumulative": cum, "count": count, "sum": total}


class RunCollector:
    """A ``prometheus_client`` collector: ``runs()`` gives ``(run name, metric_data)`` pairs
    at each scrape (the dashboard passes its once-a-second cache)."""

    def __init__(self, runs: Callable[[], Iterable[tuple[str, dict[str, Any]]]]) -> None:
        self.runs = runs

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        tasks = GaugeMetricFamily("pipefarm_tasks", "Tasks in each state.", labels=["run", "state"])
        attempts = CounterMetricFamily("pipefarm_attempts", "Attempts that ended, by outcome.",
                                       labels=["run", "outcome"])
        hist = HistogramMetricFamily("pipefarm_task_duration_seconds",
                                     "Durations of succeeded attempts.", labels=["run"])
        workers = GaugeMetricFamily("pipefarm_workers", "Workers by state (alive, stale, gone).",
                                    labels=["run", "state"])
        hb = GaugeMetricFamily("pipefarm_heartbeat_age_seconds",
                               "Seconds since each worker that is not gone last heartbeat.",
                               labels=["run", "worker"])
        rate = GaugeMetricFamily("pipefarm_throughput_tasks_per_second",
                                 "Tasks that ended per second over the last minute.",
                                 labels=["run"])
        for name, d in self.runs():
            for s in State:
                tasks.add_metric([name, s.label], d["counts"].get(s.label, 0))
            for o in Outcome:
                attempts.add_metric([name, o.label], d["attempts"].get(o.label, 0))
            h = d["durations"]
            buckets = [(_le(e), c) for e, c in zip(h["edges"], h["cumulative"], strict=True)]
            buckets.append(("+Inf", h["count"]))
            hist.add_metric([name], buckets, sum_value=h["sum"])
            by_state = dict.fromkeys(WORKER_STATES, 0)
            for w in d["workers"]:
                by_state[w["state"]] = by_state.get(w["state"], 0) + 1
                if w["state"] != "gone" and w["heartbeat_age_s"] is not None:
                    hb.add_metric([name, w["id"]], w["heartbeat_age_s"])
            for st, n in by_state.items():
                workers.add_metric([name, st], n)
            rate.add_metric([name], d["throughput_per_s"])
        yield from (tasks, attempts, hist, workers, hb, rate)


def _le(edge: float) -> str:
    """A bucket edge as Prometheus writes it (``0.005``, ``1.0``, ``+Inf``)."""
    return "+Inf" if math.isinf(edge) else repr(float(edge))


def render(runs: Callable[[], Iterable[tuple[str, dict[str, Any]]]]) -> tuple[bytes, str]:
    """The text exposition of ``runs``' metrics and its content type, from a fresh registry."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunCollector(runs))
    return generate_latest(registry), CONTENT_TYPE_LATEST

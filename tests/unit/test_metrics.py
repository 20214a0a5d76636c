"""Issue 10: ``/metrics`` (a prometheus-client collector reading the catalog at scrape time)
and the Grafana board that queries it.

The exposition is parsed with ``prometheus_client.parser``; its values must equal what
``pipefarm status --json`` and the catalog say.
"""

from __future__ import annotations

import json
import re
import urllib.request
from importlib import resources
from pathlib import Path

import pytest
import tasks_lib as T
from cli_lib import ok
from prometheus_client.parser import text_string_to_metric_families

import pipefarm as pf
from pipefarm.observe.metrics import DURATION_BUCKETS, EXPORTED
from pipefarm.states import Outcome, State


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run: 60 Python tasks, 6 raising (one retry each), 20 cancelled."""
    d = tmp_path_factory.mktemp("metrics") / "r"
    run = pf.Run.create(d)
    run.map(T.square, range(54))
    run.map(T.explode_with, range(6), retries=1)
    later = run.map(T.square, range(20))
    run.cancel(later)
    run.execute(workers=2, progress=False)
    run.close()
    return d


def scrape(url: str) -> dict[str, list]:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


@pytest.fixture(scope="module")
def samples(run_dir: Path) -> dict[str, list]:
    with pf.Run.open(run_dir) as run, run.serve() as d:
        return scrape(d.url + "metrics")


def by(samples: list, label: str) -> dict[str, float]:
    return {s.labels[label]: s.value for s in samples}


def test_tasks_by_state_equal_status(samples, run_dir: Path) -> None:
    status = json.loads(ok("status", run_dir, "--json", cwd=run_dir.parent))
    got = by(samples["pipefarm_tasks"], "state")
    assert got == {k: float(v) for k, v in status["counts"].items()}
    assert got["succeeded"] == 54 and got["failed"] == 6 and got["cancelled"] == 20
    assert {s.labels["run"] for s in samples["pipefarm_tasks"]} == {"r"}


def test_attempts_by_outcome(samples) -> None:
    got = by(samples["pipefarm_attempts_total"], "outcome")
    assert set(got) == {o.label for o in Outcome}
    assert got["succeeded"] == 54 and got["failed"] == 12  # 6 tasks x 2 attempts


def test_duration_histogram(samples, run_dir: Path) -> None:
    buckets = samples["pipefarm_task_duration_seconds_bucket"]
    assert [s.labels["le"] for s in buckets][-1] == "+Inf"
    assert len(buckets) == len(DURATION_BUCKETS) + 1
    values = [s.value for s in buckets]
    assert values == sorted(values) and values[-1] == 54
    assert samples["pipefarm_task_duration_seconds_count"][0].value == 54
    with pf.Run.open(run_dir) as run:
        total = sum(a.ended_at - a.started_at for t in run.tasks(state="succeeded")
                    for a in run.attempts(t.id) if a.outcome == "succeeded")
    assert samples["pipefarm_task_duration_seconds_sum"][0].value == pytest.approx(total, rel=1e-6)


def test_workers_heartbeats_and_throughput(samples) -> None:
    workers = by(samples["pipefarm_workers"], "state")
    assert set(workers) == {"alive", "stale", "gone"} and sum(workers.values()) >= 1
    assert samples["pipefarm_throughput_tasks_per_second"][0].value >= 0
    for s in samples.get("pipefarm_heartbeat_age_seconds", []):
        assert s.value >= 0 and s.labels["worker"]


def test_every_exported_name_is_there(samples) -> None:
    assert set(EXPORTED) - {"pipefarm_heartbeat_age_seconds"} <= set(samples)


def test_grafana_panels_query_only_exported_metrics(samples) -> None:
    board = json.loads(resources.files("pipefarm.observe").joinpath("grafana.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    used = {m for e in exprs for m in re.findall(r"\bpipefarm_[a-z_]+\b", e)}
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for word in ("state", "throughput", "p50", "failures", "workers", "heartbeat"):
        assert word in titles
    assert "pipefarm_task_duration_seconds_bucket" in used
    assert used <= set(EXPORTED)
    assert used - {"pipefarm_heartbeat_age_seconds"} <= set(samples)


def test_scrape_uses_a_fresh_registry(run_dir: Path) -> None:
    from prometheus_client import REGISTRY, generate_latest

    with pf.Run.open(run_dir) as run, run.serve() as a, run.serve() as b:
        assert scrape(a.url + "metrics").keys() == scrape(b.url + "metrics").keys()
    assert b"pipefarm_tasks" not in generate_latest(REGISTRY)
    assert State.SUCCEEDED.label == "succeeded"

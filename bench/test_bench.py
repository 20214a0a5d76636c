"""Tests of the harness itself (not of pipefarm): ``pytest bench/test_bench.py``."""

from __future__ import annotations

import time

import pytest

from bench import core
from bench.render_readme import END, START, replace_block


def test_child_returns_the_result():
    assert core.run_child("bench.tasks:noop", {"x": 41}, timeout=60) == 41


def test_missing_module_is_unavailable():
    with pytest.raises(core.Unavailable) as ei:
        core.run_child("bench.no_such_module:f", {}, timeout=60)
    assert ei.value.reason.startswith("not available: ModuleNotFoundError")


def test_exception_is_a_failure_with_traceback():
    with pytest.raises(core.Unavailable) as ei:
        core.run_child("bench.tasks:read_stamps", {"path": 3.5}, timeout=60)
    assert ei.value.reason.startswith("failed: ")
    assert "Traceback" in ei.value.traceback


def test_timeout_kills_the_child():
    t = time.monotonic()
    with pytest.raises(core.Unavailable) as ei:
        core.run_child("bench.tasks:sleep_s", {"seconds": 60}, timeout=2)
    assert ei.value.reason == "timeout after 2 s"
    assert time.monotonic() - t < 20


def test_measure_skips_an_unavailable_system_and_takes_medians():
    ctx = core.Context(verbose=False, settle=0)
    ms = ctx.measure(
        [
            core.Job(
                "ok", "bench.workloads.import_time:child", {"module": "json", "repeats": 1}, 2
            ),
            core.Job("gone", "bench.no_such_module:f", {}, 3),
        ]
    )
    assert len(ms["ok"].samples) == 2 and ms["ok"].median("import_s") is not None
    assert len(ms["gone"].errors) == 1 and ms["gone"].reason.startswith("not available")
    rows = core.metric_rows("T", {"pipefarm": ms["ok"], "gone": ms["gone"]}, "m", "s", "import_s")
    assert rows[1].value is None and rows[1].na.startswith("not available")
    md = core.to_markdown(rows, {"mode": "test"})
    assert "n/a (not available" in md


def test_ratio_and_targets():
    m1 = core.Measurement("pipefarm", samples=[{"v": 10.0}, {"v": 30.0}, {"v": 20.0}])
    m2 = core.Measurement("peer", samples=[{"v": 5.0}])
    rows = core.metric_rows(
        "T",
        {"pipefarm": m1, "peer": m2},
        "rate",
        "tasks/s",
        "v",
        targets={"peer": ("≥ 2×", core.ratio_at_least(2.0))},
    )
    assert rows[0].value == 20.0 and rows[0].ratio_vs is None
    assert rows[1].ratio_vs == 4.0 and rows[1].met is True


def test_readme_block():
    text = f"# t\n\n{START}\nold numbers\n{END}\n\nrest\n"
    new = replace_block(text, "| a |\n| --- |\n")
    assert "old numbers" not in new and "| a |" in new and new.endswith("rest\n")
    assert replace_block(new, "| a |\n| --- |\n") == new
    with pytest.raises(ValueError):
        replace_block("no markers", "x")

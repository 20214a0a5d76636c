"""Where an array worker learns its walltime (backends/array/walltime.py): --time, the
scheduler's and pipefarm's environment variables, squeue's durations."""

from __future__ import annotations

import time

import pytest

from pipefarm.backends.array.walltime import END_ENV, WARN_ENV, find_walltime, slurm_duration


@pytest.mark.parametrize("text,secs", [
    ("59", 59), ("4:59", 299), ("1:00:00", 3600), ("2-03:04:05", 2 * 86400 + 11045),
    ("1-02", 86400 + 7200), ("UNLIMITED", None), ("NOT_SET", None), ("INVALID", None), ("", None),
])
def test_squeue_durations(text: str, secs: float | None) -> None:
    assert slurm_duration(text) == secs


def test_time_option_first_then_slurm_then_pipefarm_variables() -> None:
    now = time.time()
    env = {"SLURM_JOB_END_TIME": str(now + 500), END_ENV: str(now + 900), WARN_ENV: "100"}
    w = find_walltime(60.0, None, env, query=False)
    assert w.source == "--time" and 59 < w.left() + 100 <= 60 and w.margin == 100
    w = find_walltime(None, 30.0, env, query=False)
    assert w.source == "SLURM_JOB_END_TIME" and 469 < w.left() <= 470
    del env["SLURM_JOB_END_TIME"]
    w = find_walltime(None, None, env, query=False)
    assert w.source == END_ENV and 799 < w.left() <= 800
    assert "from PIPEFARM_WALLTIME_END" in w.describe()


def test_no_limit_known_and_bad_values_are_ignored() -> None:
    w = find_walltime(None, None, {END_ENV: "soon", WARN_ENV: "-3"}, query=False)
    assert w.end is None and w.left() is None and w.margin == 0
    assert "no walltime known" in w.describe()


def test_an_unknown_slurm_job_gives_no_limit() -> None:
    """A job id squeue does not know gives no limit (the worker places everything) rather
    than an error (a real job's time left: tests/cluster/test_walltime_placement.py)."""
    w = find_walltime(None, None, {"SLURM_JOB_ID": "999999999"})
    assert w.end is None


def test_time_classes_of_blocks_and_their_split_children() -> None:
    from pipefarm.store.shared_fs.claims import BlockState
    from pipefarm.store.shared_fs.layout import Wave, child_id
    from pipefarm.store.shared_fs.placement import has_time, need_of, only_too_long_left

    wave = Wave(blocks=5, final=True, times=[(2, 3, 600.0)])
    assert [need_of(wave, b) for b in range(1, 6)] == [0.0, 600.0, 600.0, 0.0, 0.0]
    assert need_of(wave, child_id(3, 1)) == 600.0  # a split keeps its family's class
    assert has_time(None, 600.0) and has_time(lambda: 10.0, 0.0)
    assert not has_time(lambda: 599.0, 600.0) and has_time(lambda: None, 600.0)
    done = {b: BlockState(0, done=True) for b in (1, 4, 5)}
    assert only_too_long_left(wave, done, lambda: 60.0)
    assert not only_too_long_left(wave, done, lambda: 3600.0)
    assert not only_too_long_left(wave, {1: BlockState(0, done=True)}, lambda: 60.0)
    assert not only_too_long_left(Wave(5, False, 1, [], [(2, 3, 600.0)]), done, lambda: 60.0)

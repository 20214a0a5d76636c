"""Two runs on two array workers share one result cache directory: real `pipefarm worker`
processes (no scheduler: they are what an array element runs), the second run's worker serves
what the first one's computed from the first one's pack file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest

import pipefarm as pf
from pipefarm.store.shared_fs import FsJournalStore

# the worker processes import nothing from tests/cluster: the task goes by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def cube(x):
    with open(os.environ["CACHE_TEST_LOG"], "a") as f:
        f.write(f"{x} {os.getpid()}\n")
    return x ** 3


def submit(tmp: Path, name: str, xs, env: dict[str, str]) -> Path:
    """A run of ``cube`` over ``xs`` with the cache, exported for array workers."""
    run_dir = tmp / name
    with pf.Run.create(run_dir) as run:
        run.map(cube, xs, cache=True, cache_dir=env["PIPEFARM_CACHE"])
    store = FsJournalStore(run_dir, workers=1)
    assert store.export().blocks >= 1
    store.close()
    return run_dir


def work(run_dir: Path, env: dict[str, str]) -> pf.Run:
    """Run ``run_dir`` by one array worker process (named after the run), then fold it."""
    w = subprocess.run([sys.executable, "-m", "pipefarm", "worker", str(run_dir), "--id",
                        run_dir.name, "--idle-exit", "2"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert w.returncode == 0, w.stderr
    store = FsJournalStore(run_dir, workers=1)
    store.fold()
    store.close()
    return pf.Run.open(run_dir)


@pytest.mark.slow
def test_two_runs_on_two_array_workers_share_a_cache_directory(tmp_path: Path) -> None:
    """Both runs are submitted while the cache is empty (nothing is served at submission):
    the second run's worker finds what the first run's worker wrote."""
    env = {**os.environ, "CACHE_TEST_LOG": str(tmp_path / "log"),
           "PIPEFARM_CACHE": str(tmp_path / "shared-cache")}
    first_dir = submit(tmp_path, "first", range(12), env)
    second_dir = submit(tmp_path, "second", range(6, 18), env)  # half of it will be known
    first = work(first_dir, env)
    log = (tmp_path / "log").read_text().splitlines()
    assert sorted(int(x.split()[0]) for x in log) == list(range(12))

    second = work(second_dir, env)
    log2 = (tmp_path / "log").read_text().splitlines()[12:]
    assert sorted(int(x.split()[0]) for x in log2) == list(range(12, 18))
    assert {x.split()[1] for x in log2}.isdisjoint({x.split()[1] for x in log}), \
        "the second run's worker is another process"
    rows = second.results(as_objects=True)
    assert [r["result"] for r in rows] == [x ** 3 for x in range(6, 18)]
    assert [r["outcome"] for r in rows] == ["cached"] * 6 + ["succeeded"] * 6
    assert [r["worker"] for r in rows] == ["second"] * 12
    assert all(r["outcome"] == "succeeded" for r in first.results(as_objects=True))
    assert len(list((tmp_path / "shared-cache" / "packs").glob("*.pack"))) == 2
    first.close()
    second.close()

"""The result cache on real runs: real run directories, cache directories and workers.

A task function appends a line to ``$CACHE_TEST_LOG`` each time it really runs, so every test
counts computations, not just outcomes.
"""

from __future__ import annotations

import importlib
import os
import sqlite3
import sys
import textwrap
from pathlib import Path

import pytest

import pipefarm as pf
from pipefarm.cache.entries import ResultCache, default_dir
from pipefarm.cache.key import function_identity, python_key
from pipefarm.task import CachePolicy


def logged(x, verbose=False):
    with open(os.environ["CACHE_TEST_LOG"], "a") as f:
        f.write(f"{x}\n")
    return {"x": x, "sq": x * x}


def runs_of(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def outcomes(run_dir: Path) -> dict[str, int]:
    """Attempts by outcome label, read from the catalog itself."""
    db = sqlite3.connect(run_dir / "catalog.db")
    try:
        rows = db.execute("SELECT outcome, count(*) FROM tasks GROUP BY outcome").fetchall()
    finally:
        db.close()
    return {pf.Outcome(o).label: n for o, n in rows}


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CACHE_TEST_LOG", str(tmp_path / "log"))
    monkeypatch.setenv("PIPEFARM_CACHE", str(tmp_path / "cache"))
    return tmp_path


def sweep(where: Path, name: str, *iterables, backend: str = "local", **kw) -> pf.Run:
    run = pf.Run.create(where / name)
    run.map(logged, *iterables, cache=True, **kw)
    run.execute(workers=2, backend=backend, progress=False)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "sequential"])
def test_a_sweep_run_twice_computes_once(env: Path, backend: str) -> None:
    first = sweep(env, "a", range(40), backend=backend)
    assert sorted(map(int, runs_of(env / "log"))) == list(range(40))
    assert outcomes(env / "a") == {"succeeded": 40}
    second = sweep(env, "b", range(40), backend=backend)
    assert len(runs_of(env / "log")) == 40, "the second sweep computed again"
    assert outcomes(env / "b") == {"cached": 40}
    assert [second.result(t) for t in range(1, 41)] == [first.result(t) for t in range(1, 41)]
    assert second.attempts(7)[0].outcome == "cached"


@pytest.mark.slow
def test_hits_known_at_submission_are_recorded_there_and_start_no_worker(env: Path) -> None:
    """A rerun's map writes the tasks the cache holds as ended (one ``cached`` attempt each)
    before execute; execute then has only the new task to run. A task submitted with
    ``after=`` waits for its dependency, cached or not (it is served where it runs)."""
    sweep(env, "a", range(10))
    run = pf.Run.create(env / "b")
    ids = run.map(logged, range(11), cache=True)
    assert run.status()["succeeded"] == 10 and run.status()["ready"] == 1
    assert [a.outcome for a in run.attempts(ids[0])] == ["cached"]
    dep = run.map(logged, [3], cache=True, after=[ids[-1]])
    assert run.status()["blocked"] == 1, "a task with a dependency is not served before it"
    summary = run.execute(workers=2, progress=False)
    assert summary.ok and runs_of(env / "log")[10:] == ["10"]
    assert [a.outcome for a in run.attempts(dep[0])] == ["cached"]
    assert [run.result(t)["sq"] for t in ids] == [x * x for x in range(11)]


@pytest.mark.slow
def test_one_changed_argument_recomputes_exactly_that_task(env: Path) -> None:
    sweep(env, "a", range(20))
    run = sweep(env, "b", [*range(19), 100])
    assert runs_of(env / "log")[20:] == ["100"]
    assert outcomes(env / "b") == {"cached": 19, "succeeded": 1}
    assert run.result(20) == {"x": 100, "sq": 10000}


@pytest.mark.slow
def test_cache_ignore_leaves_an_argument_out_of_the_key(env: Path) -> None:
    sweep(env, "a", range(5), [False] * 5, cache_ignore=["verbose"])
    sweep(env, "b", range(5), [True] * 5, cache_ignore=["verbose"])
    assert len(runs_of(env / "log")) == 5 and outcomes(env / "b") == {"cached": 5}
    sweep(env, "c", range(5), [True] * 5)  # not ignored: verbose is in the key
    assert len(runs_of(env / "log")) == 10


@pytest.mark.slow
def test_same_key_twice_in_one_run_computes_once(env: Path) -> None:
    run = pf.Run.create(env / "a")
    run.map(logged, [1, 2, 1, 1, 2, 3], cache=True)
    run.execute(workers=2, progress=False)
    assert sorted(runs_of(env / "log")) == ["1", "2", "3"]
    assert outcomes(env / "a") == {"succeeded": 3, "cached": 3}
    assert [run.result(t)["x"] for t in range(1, 7)] == [1, 2, 1, 1, 2, 3]


MODULE = """
import os
def step(x):
    with open(os.environ["CACHE_TEST_LOG"], "a") as f:
        f.write(f"{x}\\n")
    return x + %d
"""


@pytest.mark.slow
def test_changed_source_recomputes_all_unless_a_version_pins_it(
        env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = env / "pkg"
    src.mkdir()
    monkeypatch.syspath_prepend(str(src))
    (src / "cachemod.py").write_text(textwrap.dedent(MODULE % 1))
    mod = importlib.import_module("cachemod")

    def go(name: str, **kw) -> pf.Run:
        run = pf.Run.create(env / name)
        run.map(mod.step, range(4), cache=True, **kw)
        run.execute(backend="sequential", progress=False)
        return run

    go("a")
    go("b")
    assert len(runs_of(env / "log")) == 4  # same source: cached
    (src / "cachemod.py").write_text(textwrap.dedent(MODULE % 2))
    importlib.reload(mod)
    assert go("c").result(1) == 2 and len(runs_of(env / "log")) == 8  # new source: all again
    go("d", cache_version="1")
    (src / "cachemod.py").write_text(textwrap.dedent(MODULE % 3))
    importlib.reload(mod)
    assert go("e", cache_version="1").result(1) == 2, "a pinned version reuses its results"
    assert len(runs_of(env / "log")) == 12
    sys.modules.pop("cachemod", None)


def test_the_decorator_pins_a_version_and_ignores_arguments() -> None:
    @pf.task(version="7", ignore=["verbose"])
    def f(x, verbose=False):
        return x

    def g(x, verbose=False):
        return x + 1

    name, ident = function_identity(f)
    assert name.endswith("f") and ident == function_identity(f, "7")[1]
    assert ident != function_identity(g, "7")[1], "the name is part of the identity"
    assert function_identity(g)[1] != function_identity(g, "7")[1]
    pol = CachePolicy("/x", identity=ident, ignore=("verbose",))
    assert python_key(pol, (1, True), {}, f) == python_key(pol, (1,), {"verbose": False}, f)


def test_closures_and_types_are_part_of_the_key() -> None:
    def make(k):
        def add(x):
            return x + k
        return add

    assert function_identity(make(1))[1] != function_identity(make(2))[1]
    pol = CachePolicy("/x", identity=b"i")
    keys = {python_key(pol, args, {}) for args in [
        ((1, 2),), ([1, 2],), (1,), (1.0,), (True,), ("1",), (b"1",), (Path("1"),),
        ({"a": 1},), ({"a": 1.0},), ({1, 2},), (frozenset({3}),), (2 ** 70,), (None,)]}
    assert len(keys) == 14
    assert python_key(pol, ({"b": 1, "a": 2},), {}) == python_key(pol, ({"a": 2, "b": 1},), {})


class Opaque:
    pass


def test_an_unknown_argument_type_is_refused_at_submission(env: Path) -> None:
    run = pf.Run.create(env / "a")
    with pytest.raises(pf.SubmissionError, match=r"task 2 .*argument 1 is of type .*Opaque"
                                                 r".*pf\.cache\.register"):
        run.map(logged, [1, Opaque(), 3], cache=True)
    assert len(run) == 0, "nothing may be written"
    with pytest.raises(pf.SubmissionError, match="argument 'verbose'"):
        run.submit_task(logged, (1,), {"verbose": Opaque()}, cache=True)
    pf.cache.register(Opaque, lambda o: "opaque")
    try:
        ids = run.map(logged, [Opaque()], cache=True, cache_ignore=())
    finally:
        from pipefarm.cache import key

        key._HOOKS.pop(Opaque)
    assert len(ids) == 1


def test_numpy_arrays_are_keyed_by_dtype_shape_and_bytes() -> None:
    np = pytest.importorskip("numpy")
    pol = CachePolicy("/x", identity=b"i")
    a = np.arange(6, dtype="int32")
    k = python_key(pol, (a,), {})
    assert k == python_key(pol, (a.copy(),), {})
    assert k != python_key(pol, (a.reshape(2, 3),), {})
    assert k != python_key(pol, (a.astype("int64"),), {})
    assert python_key(pol, (a[::2],), {}) == python_key(pol, (np.array([0, 2, 4], "int32"),), {})


def test_a_cache_directory_others_can_write_is_refused(env: Path) -> None:
    bad = env / "shared"
    bad.mkdir(mode=0o777)
    os.chmod(bad, 0o777)
    run = pf.Run.create(env / "a")
    with pytest.raises(pf.UnsafeRun, match="chmod go-w"):
        run.map(logged, [1], cache=True, cache_dir=str(bad))
    assert len(run) == 0
    with pytest.raises(pf.UnsafeRun):
        ResultCache(bad)


def test_where_the_cache_lives(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_dir(None) == str(env / "cache")
    assert default_dir(env / "x") == str(env / "x"), "cache_dir= wins over $PIPEFARM_CACHE"
    monkeypatch.delenv("PIPEFARM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(env / "xdg"))
    assert default_dir(None) == str(env / "xdg" / "pipefarm")


def test_large_results_live_in_blobs_checked_by_hash(env: Path) -> None:
    c = ResultCache(env / "c")
    big = os.urandom(100_000)
    c.put([(b"k" * 32, "f", big), (b"s" * 32, "f", b"small")])
    c.close()
    c = ResultCache(env / "c")
    assert c.get(b"k" * 32) == (True, big) and c.get(b"s" * 32) == (True, b"small")
    (blob,) = (env / "c" / "blobs").iterdir()
    data = bytearray(blob.read_bytes())
    data[10] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.warns(pf.cache.CacheWarning, match="damaged"):
        assert c.get(b"k" * 32) == (False, None)
    c.close()


def fails_first(x):
    """Fails while the marker file is missing (and creates it): the first call of a sweep."""
    marker = os.environ["CACHE_TEST_LOG"] + ".marker"
    with open(os.environ["CACHE_TEST_LOG"], "a") as f:
        f.write(f"{x}\n")
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("first call fails")
    return x + 1


@pytest.mark.slow
def test_a_twin_held_behind_a_failure_runs(env: Path) -> None:
    run = pf.Run.create(env / "a")
    run.map(fails_first, [5, 5], cache=True)
    run.execute(workers=2, progress=False)
    assert runs_of(env / "log") == ["5", "5"], "the held twin ran once its twin failed"
    first, second = sorted(run.tasks(), key=lambda t: t.started_at)
    assert (first.state, second.state) == ("failed", "succeeded")
    assert second.started_at >= first.ended_at, "the twin ran while the first was in flight"
    again = pf.Run.create(env / "b")
    again.map(fails_first, [5], cache=True)
    again.execute(backend="sequential", progress=False)
    assert outcomes(env / "b") == {"cached": 1} and again.result(1) == 6


CONCURRENT = """
import sys
import pipefarm as pf
from tasks_lib import square
run = pf.Run.create(sys.argv[1])
run.map(square, range(int(sys.argv[2]), int(sys.argv[3])), cache=True, cache_dir=sys.argv[4])
run.execute(workers=2, progress=False)
"""


@pytest.mark.slow
def test_two_runs_at_once_share_a_cache_directory(tmp_path: Path) -> None:
    """Two processes write the same cache directory at the same time: each its own pack, no
    damage, every entry readable by a third."""
    import subprocess

    from tasks_lib import square

    script = tmp_path / "go.py"
    script.write_text(CONCURRENT)
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / name), a, b,
                               str(cache)]) for name, a, b in (("a", "0", "3000"),
                                                               ("b", "1500", "4500"))]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    with ResultCache(cache) as c:
        s = c.stats()
        assert s.packs == 2 and s.damaged_records == 0 and s.torn_bytes == 0
        assert s.entries == 4500, "each key once in the index, however many wrote it"
    third = pf.Run.create(tmp_path / "c")
    third.map(square, range(4500), cache=True, cache_dir=str(cache))
    third.execute(backend="sequential", progress=False)
    assert outcomes(tmp_path / "c") == {"cached": 4500}
    assert third.result(4500) == 4499 ** 2

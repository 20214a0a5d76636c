"""The ray backend against a real Ray: the session's shared head (``tests/ray_lib.py``) reached by
address, and one Ray started and stopped by ``pipefarm run`` itself."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import ray_lib
import tasks_lib as T
from cli_lib import ok
from engines_lib import assert_once_each

import pipefarm as pf

ray_address = ray_lib.ray_address  # the session's shared head (a fixture)


@pytest.fixture(autouse=True)
def _need_ray():
    ray_lib.require_ray()


@pytest.mark.slow
def test_python_and_command_tasks_with_output(tmp_path, ray_address):
    d = tmp_path / "run"
    with pf.Run.create(d) as run:
        squares = run.map(T.square, range(2000))
        cmds = run.submit_cmd("echo line-{i}", [{"i": str(i)} for i in range(20)])
        said = run.submit(print, "hello from ray")
        big = run.map(T.big_bytes, range(2), [4 << 20] * 2)  # a report in many reads
        summary = run.execute(workers=2, backend=pf.backends.Ray(address=ray_address),
                              progress=False)
        assert summary.ok and summary.total == 2023 and summary.attempts == 2023, summary
        assert [run.result(t) for t in squares] == [i * i for i in range(2000)]
        assert_once_each(run, [*squares, *cmds, said])
        assert all(run.result(t) == T.big_bytes(i, 4 << 20) for i, t in enumerate(big))
        assert run.output(cmds[7]) == b"line-7\n"
        workers = {t.worker for t in run.tasks(ids=list(squares))}
        assert len(workers) <= 2 and all(w.startswith("ray-") for w in workers), workers
    assert ok("logs", d, str(said), cwd=tmp_path) == "hello from ray\n"
    T.wait_until(lambda: not T.live_procs_with_cmdline(str(d)), 10,
                 what="every pipefarm worker process to be gone")


@pytest.mark.slow
def test_retries_timeout_and_dependencies(tmp_path, ray_address):
    grandchild = tmp_path / "grandchild.pid"
    with pf.Run.create(tmp_path / "run") as run:
        flaky = run.submit_task(T.count_then, (str(tmp_path / "count"), 3, "third time"),
                                retries=2, backoff=0.05)
        slow = run.submit_task(T.sleep_forever, (30.0,), timeout=1.0)
        skipped = run.submit_task(T.ident, ("never",), after=[slow])
        first = run.submit_task(T.log_start, (str(tmp_path / "order"), "a", 0.2))
        second = run.submit_task(T.log_start, (str(tmp_path / "order"), "b"), after=[first])
        # a command whose own child outlives it unless the whole process group is killed
        hung = run.submit_cmd(f"sh -c 'sleep 30 & echo $! > {grandchild}; wait'", timeout=1.0)[0]
        t0 = time.monotonic()
        summary = run.execute(workers=2, backend="ray", address=ray_address, progress=False)
        assert time.monotonic() - t0 < 20
        assert run.result(flaky) == "third time"
        assert [a.outcome for a in run.attempts(flaky)] == ["failed", "failed", "succeeded"]
        assert [a.outcome for a in run.attempts(slow)] == ["timed_out"]
        assert "timed out after 1 s" in run.attempts(slow)[0].error
        assert [a.outcome for a in run.attempts(hung)] == ["timed_out"]
        T.wait_until(lambda: not T.is_alive(int(grandchild.read_text())), 5,
                     what="the timed-out command's grandchild to be killed")
        assert run.tasks(ids=[skipped])[0].state == "skipped"
        assert (tmp_path / "order").read_text().split() == ["a", "b"]
        assert run.result(second) == "b"
        assert summary.counts["failed"] == 2 and summary.counts["skipped"] == 1, summary


@pytest.mark.slow
def test_without_an_address_the_run_starts_and_stops_its_own_ray(tmp_path):
    d = tmp_path / "run"
    with pf.Run.create(d) as run:
        ids = run.map(T.square, range(200))
    proc = subprocess.Popen([sys.executable, "-m", "pipefarm", "run", str(d), "--backend", "ray",
                             "--workers", "2", "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    with pf.Run.open(d) as run:
        assert [run.result(t) for t in ids] == [i * i for i in range(200)]
        assert {t.worker.split("-")[0] for t in run.tasks(ids=ids)} == {"ray"}
    # its Ray's processes live in a session directory named after the driver's pid: all gone
    T.wait_until(lambda: not T.live_procs_with_cmdline(f"_{proc.pid}/logs"), 10,
                 what="the Ray started for the run to be shut down")


@pytest.mark.slow
def test_gpu_tasks_and_slots_too_big_are_refused_not_left_hanging(tmp_path, ray_address):
    with pf.Run.create(tmp_path / "run") as run:
        g = run.submit_task(T.square, (3,), gpus=1)
        with pytest.raises(RuntimeError, match="needs 1 GPU"):
            run.execute(workers=1, backend="ray", address=ray_address, progress=False)
        run.cancel([g])
        big = run.submit_task(T.square, (4,), cpus=64)
        with pytest.raises(RuntimeError, match="needs 64 CPU"):
            run.execute(workers=1, backend="ray", address=ray_address, progress=False)
        assert run.attempts(g) == [] and run.attempts(big) == []


GPU_RUN = """
import json, os, sys, time
import pipefarm as pf

def visible(i):
    time.sleep(0.1)
    return os.environ.get("CUDA_VISIBLE_DEVICES")

with pf.Run.create(sys.argv[1]) as run:
    ids = run.map(visible, range(6), gpus=1)
    # a Ray of its own that declares two GPUs (Ray assigns their ids to actors whether or
    # not the devices exist: what is tested is pipefarm's mapping, not CUDA)
    run.execute(workers=2, backend=pf.backends.Ray(workers=2, init={"num_gpus": 2}),
                progress=False)
    print(json.dumps([run.result(t) for t in ids]))
"""


@pytest.mark.slow
def test_gpu_tasks_see_the_gpus_ray_gave_their_slot(tmp_path):
    """Each slot's actor holds one of two GPUs Ray declares; a task needing one runs in the
    device Ray made visible to its slot (without the mapping it would not be claimed at all,
    or would see none)."""
    out = subprocess.run([sys.executable, "-c", GPU_RUN, str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert len(seen) == 6 and set(seen) <= {"0", "1"}, seen

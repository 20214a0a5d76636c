"""Failure contract, MPI: a worker rank SIGKILLed mid-run.

Open MPI (like most MPI libraries) aborts the whole job when a rank dies, rank 0 (the
coordinator) with it. What must hold then: the job ends promptly, no process of it is left
behind, the catalog stays consistent, and a plain ``pipefarm run RUN`` (local) finishes every
task with exactly one successful attempt and the right value.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import tasks_lib as T
from mpi_lib import mpi_env, mpiexec_pipefarm, rank_pids, require_mpi

import pipefarm as pf
from pipefarm.store.sqlite.query import CatalogQuery


@pytest.mark.slow
def test_worker_rank_killed_leaves_a_resumable_run(tmp_path) -> None:
    require_mpi()
    d = tmp_path / "run"
    run = pf.Run.create(d)
    n = 300
    ids = run.map(T.sleep_then, range(n), [0.02] * n)
    run.close()
    mpi = subprocess.Popen(mpiexec_pipefarm(3, "run", str(d), "--backend", "mpi", "--no-progress"),
                           env=mpi_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, start_new_session=True)
    try:
        def progressed() -> bool:
            q = CatalogQuery.open(d)
            try:
                return q.counts().get("succeeded", 0) >= 40
            finally:
                q.close()

        T.wait_until(progressed, 20, interval=0.05, what="40 tasks succeeded under mpiexec")
        ranks = rank_pids(mpi.pid)
        if 1 not in ranks:
            pytest.skip(f"cannot tell the ranks of this MPI library apart: {ranks}")
        procs = set(ranks.values())
        for pid in ranks.values():  # the ranks' worker processes (and their tasks)
            procs.update(T.descendants(pid))
        os.kill(ranks[1], signal.SIGKILL)
        t0 = time.monotonic()
        rc = mpi.wait(timeout=20)
        aborted_s = time.monotonic() - t0
        assert rc != 0
        assert aborted_s < 10, f"the job took {aborted_s:.1f} s to end after its rank died"
        T.wait_until(lambda: not any(T.is_alive(p) for p in procs), 5,
                     what="every rank and worker process gone")
    finally:
        if mpi.poll() is None:
            os.killpg(mpi.pid, signal.SIGKILL)
            mpi.wait()

    run = pf.Run.open(d)
    try:
        before = run.store.counts()
        assert before["succeeded"] < n, before  # it was stopped mid-run
        summary = run.execute(workers=2, progress=False)
        assert summary.ok, summary
        for t in ids:
            assert run.result(t) == t - ids[0]
            outcomes = [a.outcome for a in run.attempts(t)]
            assert outcomes.count("succeeded") == 1, (t, outcomes)
            assert set(outcomes) <= {"succeeded", "lost"}, (t, outcomes)
    finally:
        run.close()

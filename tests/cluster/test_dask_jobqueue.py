"""The dask backend on a ``dask_jobqueue.SLURMCluster``: Dask workers as real SLURM jobs on
this host's SLURM, pipefarm's worker slots inside them."""

from __future__ import annotations

import sys

import pytest
import tasks_lib as T
from cluster_lib import slurm_up
from conftest import service_absent

import pipefarm as pf


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_run_on_a_slurm_cluster_of_dask_workers(tmp_path):
    if not slurm_up():
        service_absent("SLURM is not running here")
    try:
        import distributed
        from dask_jobqueue import SLURMCluster
    except ImportError:
        service_absent("dask_jobqueue is not installed (pip install dask-jobqueue)")
    cluster = SLURMCluster(cores=1, processes=1, memory="1GB", walltime="00:05:00",
                           python=sys.executable, scheduler_options={"host": "127.0.0.1"},
                           job_extra_directives=[f"--chdir={tmp_path}"],
                           log_directory=str(tmp_path / "slurm-logs"))
    try:
        cluster.scale(2)
        with distributed.Client(cluster, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
            with pf.Run.create(tmp_path / "run") as run:
                ids = run.map(T.square, range(200))
                (cmd,) = run.submit_cmd("echo on slurm")
                summary = run.execute(backend=pf.backends.Dask(client=client), progress=False)
                assert summary.ok, summary
                assert [run.result(t) for t in ids] == [i * i for i in range(200)]
                assert run.output(cmd) == b"on slurm\n"
                workers = {t.worker for t in run.tasks(ids=list(ids))}
                assert workers and all(w.startswith("dask-") for w in workers), workers
                assert "dask" in run.store.backends_used()
    finally:
        cluster.close()

"""The generated submit files stay byte-identical: a digest of every scheduler's files for a
few specs, recorded from the code before it was split into one module per scheduler
(``backends/array/``). A change here is a change of what every site submits: make it on
purpose, and record the new digests."""

from __future__ import annotations

import hashlib
import json

import pytest

from pipefarm.backends.array import SCHEDULERS, ArraySpec, render

SPECS = [
    dict(run_dir="/tmp/r", elements=1),
    dict(run_dir="/tmp/r x", elements=4, workers_per_element=2, time="1-02:03:04", partition="p",
         account="a", cpus_per_worker=2, gpus_per_worker=1, throttle=2, extra=["--foo", "# c"],
         signal="USR1", warn_seconds=300, python="python3",
         setup=["module load x", "echo 'hi'"], mem="4G"),
    dict(run_dir="/tmp/r", elements=3, time=90, mem_per_worker="1500M", workers_per_element=3,
         log_dir="/tmp/l", warn_seconds=0),
    dict(run_dir="/tmp/r", elements=2, time="00:10:00", warn_seconds=100, job_name="j.x",
         parallel_env="mpi", cpus_per_worker=4),
]

#: "spec index/scheduler" -> the first 16 hex digits of the sha256 of the rendered files (or
#: of the ValueError's message: PBS and HTCondor refuse a path with white space)
DIGESTS = {
    "0/htcondor": "8b02e22e08c4e05b",
    "0/lsf": "a4ed4a8726a64b54",
    "0/pbs": "c82c0c9fe6f14fed",
    "0/sge": "811e2a2543247196",
    "0/slurm": "5c4cc8bc6de1d2b6",
    "1/htcondor": "b549b9b3fc4e229e",
    "1/lsf": "5d3a045359d04383",
    "1/pbs": "6598c1d27d22faea",
    "1/sge": "c159223177ec03eb",
    "1/slurm": "df9b6100dca27d3d",
    "2/htcondor": "cceb2a4c91ee924a",
    "2/lsf": "79413ed248c8be78",
    "2/pbs": "49179cde665f7ee3",
    "2/sge": "a520dffb4a8f7c35",
    "2/slurm": "4258a6014342f8ad",
    "3/htcondor": "00d9c398eab2800f",
    "3/lsf": "cb6005d734c2c7e1",
    "3/pbs": "e8dd60b0a18b62c3",
    "3/sge": "f8afc28107b93439",
    "3/slurm": "f916d1e74650f7db",
}


@pytest.mark.parametrize("key", sorted(DIGESTS))
def test_generated_files_unchanged(key: str) -> None:
    index, scheduler = key.split("/")
    spec = ArraySpec(**{"python": "/opt/py/bin/python3", **SPECS[int(index)]})  # type: ignore[arg-type]
    try:
        r = render(scheduler, spec, "/tmp/out")
        blob = json.dumps([r.scheduler, r.submit, r.files, r.executables], sort_keys=True)
    except ValueError as e:
        blob = "ValueError: " + str(e)
    assert hashlib.sha256(blob.encode()).hexdigest()[:16] == DIGESTS[key]


def test_every_scheduler_is_covered() -> None:
    assert {k.split("/")[1] for k in DIGESTS} == set(SCHEDULERS)

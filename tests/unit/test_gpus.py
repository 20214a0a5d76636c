"""GPU discovery and assignment (``pipefarm.execute.gpus``)."""

from __future__ import annotations

import os
import random
import shutil
import threading
from pathlib import Path

import pytest

from pipefarm.execute import gpus
from pipefarm.execute.cmd import run_command
from pipefarm.execute.gpus import DevicePool, detect, detect_gpus, device_env, parse_device_list
from pipefarm.execute.output import OutputSink, read_output
from pipefarm.execute.template import Command

SMI_OUTPUT = """\
GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-aaaaaaaa-1111-2222-3333-444444444444)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-bbbbbbbb-1111-2222-3333-444444444444)
  MIG 3g.20gb     Device  0: (UUID: MIG-11111111-2222-3333-4444-555555555555)
  MIG 3g.20gb     Device  1: (UUID: MIG-66666666-2222-3333-4444-555555555555)
GPU 2: NVIDIA A100-SXM4-40GB (UUID: GPU-cccccccc-1111-2222-3333-444444444444)
"""


def test_parse_device_list():
    assert parse_device_list("0,1,2,3") == ["0", "1", "2", "3"]
    assert parse_device_list(" 0, 2 ,") == ["0", "2"]
    assert parse_device_list("0-3") == ["0", "1", "2", "3"]
    assert parse_device_list("4,0-1") == ["4", "0", "1"]
    assert parse_device_list("") == []
    assert parse_device_list("NoDevFiles") == []
    assert parse_device_list("-1") == []
    assert parse_device_list("1,-1,2") == ["1"]  # like CUDA: the list ends at an invalid entry
    assert parse_device_list("0,0,1") == ["0", "1"]
    assert parse_device_list("GPU-abc,MIG-def") == ["GPU-abc", "MIG-def"]
    with pytest.raises(ValueError):
        parse_device_list("3-1")


def test_parse_nvidia_smi_list_uses_mig_instances():
    assert gpus.parse_nvidia_smi_list(SMI_OUTPUT) == [
        "0",
        "MIG-11111111-2222-3333-4444-555555555555",
        "MIG-66666666-2222-3333-4444-555555555555",
        "2",
    ]
    assert gpus.parse_nvidia_smi_list("") == []


def test_detect_honours_scheduler_variables():
    assert detect({"CUDA_VISIBLE_DEVICES": "2,3"}) == ("nvidia", ["2", "3"])
    assert detect({"CUDA_VISIBLE_DEVICES": ""}) == ("nvidia", [])  # granted none: use none
    assert detect({"ROCR_VISIBLE_DEVICES": "1"}) == ("amd", ["1"])
    assert detect({"HIP_VISIBLE_DEVICES": "0,1"}) == ("amd", ["0", "1"])
    assert detect({"ZE_AFFINITY_MASK": "0.0,1"}) == ("intel", ["0.0", "1"])
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": "GPU-x"}) == ["GPU-x"]


def test_detect_runs_nvidia_smi(tmp_path):
    smi = tmp_path / "nvidia-smi"
    (tmp_path / "out.txt").write_text(SMI_OUTPUT)
    smi.write_text(f"#!/bin/sh\n[ \"$1\" = -L ] && cat {tmp_path / 'out.txt'}\n")
    smi.chmod(0o755)
    assert detect({"PATH": str(tmp_path)}) == ("nvidia", gpus.parse_nvidia_smi_list(SMI_OUTPUT))


def test_detect_survives_a_hanging_nvidia_smi(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nexec sleep 30\n")
    smi.chmod(0o755)
    monkeypatch.setattr(gpus, "_SMI_TIMEOUT", 0.3)
    vendor, devices = detect({"PATH": str(tmp_path)})
    assert vendor in ("nvidia", "amd")  # falls through to /proc and KFD: whatever this host has
    assert isinstance(devices, list)


def test_detect_on_this_host():
    env = {k: v for k, v in os.environ.items() if k not in
           ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ZE_AFFINITY_MASK")}
    found = detect_gpus(env)
    proc_gpus = "/proc/driver/nvidia/gpus"
    if os.path.isdir(proc_gpus) and os.listdir(proc_gpus):
        assert len(found) >= len(os.listdir(proc_gpus)), "NVIDIA GPUs here, none detected"
    elif not shutil.which("nvidia-smi") and not os.path.exists("/dev/kfd"):
        assert found == []


def test_device_env():
    assert device_env(["0", "2"]) == {"CUDA_VISIBLE_DEVICES": "0,2"}
    assert device_env([]) == {"CUDA_VISIBLE_DEVICES": ""}
    assert device_env(["3", "5"], "amd") == {
        "ROCR_VISIBLE_DEVICES": "3,5",
        "HIP_VISIBLE_DEVICES": "0,1",
        "CUDA_VISIBLE_DEVICES": "0,1",
    }
    assert device_env([], "amd")["ROCR_VISIBLE_DEVICES"] == "-1"
    assert device_env(["1"], "intel") == {"ZE_AFFINITY_MASK": "1"}
    with pytest.raises(ValueError):
        device_env(["0"], "acme")


def test_pool_basics():
    pool = DevicePool(["0", "1", "2", "3"])
    assert len(pool) == 4
    a = pool.acquire(2)
    assert a == ["0", "1"]
    b = pool.acquire(2)
    assert b == ["2", "3"]
    assert pool.acquire(1) is None
    assert pool.acquire(0) == []
    pool.release(a)
    assert pool.acquire(3) is None
    assert pool.acquire(1) == ["0"]
    with pytest.raises(ValueError):
        pool.acquire(5)  # can never be satisfied: say so instead of waiting forever
    with pytest.raises(ValueError):
        pool.release(["1"])  # not held
    with pytest.raises(ValueError):
        pool.release(["7"])
    pool.release(b)
    with pytest.raises(ValueError):
        pool.release(b)  # twice
    assert pool.in_use() == {"0": 1, "1": 0, "2": 0, "3": 0}


def test_pool_sharing():
    shared = DevicePool(["0", "1"], share=2)
    got = [shared.acquire(1) for _ in range(4)]
    assert sorted(d for g in got for d in g) == ["0", "0", "1", "1"]  # spread, least loaded first
    assert shared.acquire(1) is None
    unlimited = DevicePool(["0"], share=True)
    assert all(unlimited.acquire(1) == ["0"] for _ in range(50))
    with pytest.raises(ValueError):
        DevicePool(["0"], share=0)


def test_pool_env_hides_gpus_only_when_there_are_some():
    assert DevicePool(["0"]).env([]) == {"CUDA_VISIBLE_DEVICES": ""}
    assert DevicePool([]).env([]) == {}
    assert DevicePool(["0", "1"], vendor="amd").env(["1"])["ROCR_VISIBLE_DEVICES"] == "1"


@pytest.mark.parametrize("share", [False, 2])
def test_pool_never_double_assigns_under_threads(share):
    devices = [str(i) for i in range(6)]
    pool = DevicePool(devices, share=share)
    limit = 1 if share is False else share
    holders = dict.fromkeys(devices, 0)
    check = threading.Lock()
    errors: list[str] = []
    acquired = [0]

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        for _ in range(1500):
            n = rnd.randint(1, 3)
            got = pool.acquire(n)
            if got is None:
                continue
            with check:
                acquired[0] += 1
                if len(set(got)) != n:
                    errors.append(f"asked {n}, got {got}")
                for d in got:
                    holders[d] += 1
                    if holders[d] > limit:
                        errors.append(f"device {d} has {holders[d]} holders")
            with check:
                for d in got:
                    holders[d] -= 1
            pool.release(got)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    assert acquired[0] > 1000
    assert all(v == 0 for v in pool.in_use().values())


def test_real_command_sees_its_devices(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    pool = DevicePool(["0", "1", "2", "3"])
    cmd = Command(shell='printf %s "${{CUDA_VISIBLE_DEVICES-unset}}"')
    with OutputSink(tmp_path, "w1") as sink:

        def seen(devs, p=pool) -> bytes:
            res = run_command(cmd, {}, timeout=10, sink=sink, task=1, attempt=1, extra_env=p.env(devs))
            assert res.ok, res
            return read_output(tmp_path, res.output, "stdout")

        first = pool.acquire(2)
        second = pool.acquire(1)
        assert seen(first) == b"0,1"
        assert seen(second) == b"2"
        assert seen([]) == b""  # asked for none on a GPU machine: sees none
        assert seen([], DevicePool([])) == b"unset"  # no GPUs at all: environment untouched

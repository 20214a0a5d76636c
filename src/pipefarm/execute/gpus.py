"""GPU discovery and assignment: which devices a worker may use and which task holds which.

A worker builds one :class:`DevicePool` from :func:`detect` (or from devices the user named),
asks it for ``acquire(n)`` before starting a task that needs ``n`` GPUs, runs the task with
:meth:`DevicePool.env` merged into its environment, and ``release``-s the devices afterwards.
Device ids are strings as the vendor's visibility variable takes them: indices (``"0"``), or
UUIDs (``"GPU-..."``, ``"MIG-..."``) when that is what the scheduler handed us.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Mapping

NVIDIA, AMD, INTEL = "nvidia", "amd", "intel"
VENDORS = (NVIDIA, AMD, INTEL)

# Visibility variables a scheduler may already have set, in the order we trust them.
_VISIBLE_VARS = (
    ("CUDA_VISIBLE_DEVICES", NVIDIA),
    ("ROCR_VISIBLE_DEVICES", AMD),
    ("HIP_VISIBLE_DEVICES", AMD),
    ("ZE_AFFINITY_MASK", INTEL),
)
_NO_DEVICES = {"", "nodevfiles", "none", "void"}  # SGE/UGE write NoDevFiles when none granted
_SMI_TIMEOUT = 5.0


def parse_device_list(text: str) -> list[str]:
    """``"0,1,2,3"`` (or ``"0-3"``, or UUIDs) -> ``["0", "1", "2", "3"]``.

    As CUDA does, the list ends at the first invalid entry (``-1`` is the usual way to hide
    every device), and ``""`` / ``NoDevFiles`` mean no device.
    """
    if text.strip().lower() in _NO_DEVICES:
        return []
    out: list[str] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("-"):
            break  # an invalid index hides it and all after it
        m = re.fullmatch(r"(\d+)-(\d+)", item)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f"bad device range {item!r}")
            out.extend(str(i) for i in range(lo, hi + 1))
        else:
            out.append(item)
    return list(dict.fromkeys(out))  # a device named twice is still one device


def _nvidia_smi(env: Mapping[str, str]) -> list[str] | None:
    """Devices ``nvidia-smi -L`` lists (MIG instances instead of their parent GPU), or None."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi", path=env.get("PATH", os.defpath))
    if exe is None:
        return None
    try:
        proc = subprocess.Popen(
            [exe, "-L"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True,
        )
    except OSError:
        return None
    try:
        text, _ = proc.communicate(timeout=_SMI_TIMEOUT)
    except subprocess.TimeoutExpired:
        # a wedged driver can hang nvidia-smi, even past SIGKILL (uninterruptible sleep):
        # kill it and move on rather than wait for it, as subprocess.run would
        proc.kill()
        try:
            proc.wait(0.5)
        except subprocess.TimeoutExpired:
            pass
        return None
    if proc.returncode != 0:
        return None
    return parse_nvidia_smi_list(text)


def parse_nvidia_smi_list(text: str) -> list[str]:
    """Devices from ``nvidia-smi -L`` output: GPU indices, or the MIG UUIDs of a MIG GPU.

    With MIG enabled, CUDA only accepts MIG instances by UUID, so a GPU that lists MIG
    devices contributes those instead of its own index.
    """
    devices: list[str] = []
    current: str | None = None
    migs: list[str] = []

    def close() -> None:
        if current is not None:
            devices.extend(migs or [current])

    for line in text.splitlines():
        gpu = re.match(r"\s*GPU (\d+):", line)
        if gpu:
            close()
            current, migs = gpu.group(1), []
            continue
        mig = re.search(r"MIG\b.*\(UUID:\s*(MIG-[^)\s]+)\)", line)
        if mig and current is not None:
            migs.append(mig.group(1))
    close()
    return devices


def _proc_nvidia() -> list[str]:
    try:
        n = len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return []
    return [str(i) for i in range(n)]


def _amd_kfd() -> list[str]:
    """AMD GPUs the kernel driver exposes: KFD topology nodes that have SIMDs (CPUs have none)."""
    if not os.path.exists("/dev/kfd"):
        return []
    root = "/sys/class/kfd/kfd/topology/nodes"
    try:
        nodes = sorted(os.listdir(root), key=lambda s: int(s) if s.isdigit() else -1)
    except OSError:
        return []
    n = 0
    for node in nodes:
        try:
            with open(f"{root}/{node}/properties") as f:
                props = dict(line.split(None, 1) for line in f if line.strip())
        except (OSError, ValueError):
            continue
        if int(props.get("simd_count", "0").strip() or 0) > 0:
            n += 1
    return [str(i) for i in range(n)]


def detect(env: Mapping[str, str] = os.environ) -> tuple[str, list[str]]:
    """``(vendor, devices)`` this process may use; ``(\"nvidia\", [])`` when there are none.

    A visibility variable already set (by SLURM, PBS, Grid Engine, or the user) wins:
    ``CUDA_VISIBLE_DEVICES``, then ``ROCR_VISIBLE_DEVICES`` / ``HIP_VISIBLE_DEVICES``, then
    ``ZE_AFFINITY_MASK``. Otherwise ``nvidia-smi -L`` (5 s timeout), then
    ``/proc/driver/nvidia/gpus``, then the AMD KFD topology.
    """
    for var, vendor in _VISIBLE_VARS:
        value = env.get(var)
        if value is not None:
            return vendor, parse_device_list(value)
    devices = _nvidia_smi(env)
    if devices:
        return NVIDIA, devices
    devices = _proc_nvidia()
    if devices:
        return NVIDIA, devices
    devices = _amd_kfd()
    if devices:
        return AMD, devices
    return NVIDIA, []


def detect_gpus(env: Mapping[str, str] = os.environ) -> list[str]:
    """The GPU devices this process may use (see :func:`detect`; this drops the vendor)."""
    return detect(env)[1]


def device_env(devs: Iterable[str], vendor: str = NVIDIA) -> dict[str, str]:
    """Environment that makes exactly ``devs`` visible to a child process.

    ``devs`` empty hides every device (``CUDA_VISIBLE_DEVICES=""``): give that to tasks that
    asked for no GPU on a machine that has some, so they cannot grab one by accident
    (:meth:`DevicePool.env` does this only when the pool has devices).
    For AMD, ROCR_VISIBLE_DEVICES selects the devices and HIP/CUDA_VISIBLE_DEVICES are set to
    the matching *logical* indices 0..n-1: HIP numbers devices after ROCr has filtered them,
    so setting both to the physical ids would hide devices, and an inherited value would do
    the same. Hiding all AMD devices uses ``-1`` (an invalid index ends the list).
    """
    devs = list(devs)
    if vendor == NVIDIA:
        return {"CUDA_VISIBLE_DEVICES": ",".join(devs)}
    if vendor == AMD:
        if not devs:
            return {"ROCR_VISIBLE_DEVICES": "-1", "HIP_VISIBLE_DEVICES": "-1",
                    "CUDA_VISIBLE_DEVICES": "-1"}
        logical = ",".join(str(i) for i in range(len(devs)))
        return {"ROCR_VISIBLE_DEVICES": ",".join(devs), "HIP_VISIBLE_DEVICES": logical,
                "CUDA_VISIBLE_DEVICES": logical}
    if vendor == INTEL:
        # Level Zero has no documented "no device" mask; an index no node has hides them all.
        return {"ZE_AFFINITY_MASK": ",".join(devs) if devs else "999999"}
    raise ValueError(f"unknown GPU vendor {vendor!r}; expected one of {', '.join(VENDORS)}")


class DevicePool:
    """Hands out GPUs to tasks; thread-safe.

    By default a device has one holder at a time. ``share=True`` lets any number of tasks
    hold a device at once; ``share=k`` (an int) allows up to ``k`` holders per device (for
    small tasks that fit several to a GPU). Least-loaded devices go first, then lower ids.
    """

    def __init__(
        self, devices: Iterable[str], vendor: str = NVIDIA, share: bool | int = False
    ) -> None:
        if vendor not in VENDORS:
            raise ValueError(f"unknown GPU vendor {vendor!r}; expected one of {', '.join(VENDORS)}")
        self.devices = list(dict.fromkeys(str(d) for d in devices))
        self.vendor = vendor
        if isinstance(share, bool):
            self.slots: int | None = None if share else 1
        elif isinstance(share, int) and share >= 1:
            self.slots = share
        else:
            raise ValueError(f"share must be True, False or a count >= 1, not {share!r}")
        self._holders = dict.fromkeys(self.devices, 0)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.devices)

    def acquire(self, n: int) -> list[str] | None:
        """``n`` distinct devices for one task, or None while not enough are free.

        Raises ValueError when ``n`` is more than the pool has at all (it would wait forever).
        """
        if n < 0:
            raise ValueError("cannot acquire a negative number of devices")
        if n == 0:
            return []
        if n > len(self.devices):
            raise ValueError(f"a task needs {n} GPUs but this worker has {len(self.devices)}")
        with self._lock:
            free = [d for d in self.devices if self.slots is None or self._holders[d] < self.slots]
            if len(free) < n:
                return None
            order = {d: i for i, d in enumerate(self.devices)}
            chosen = sorted(free, key=lambda d: (self._holders[d], order[d]))[:n]
            chosen.sort(key=order.__getitem__)
            for d in chosen:
                self._holders[d] += 1
            return chosen

    def release(self, devs: Iterable[str]) -> None:
        """Give back devices from :meth:`acquire`; releasing one not held raises ValueError."""
        devs = list(devs)
        with self._lock:
            need: dict[str, int] = {}
            for d in devs:
                need[d] = need.get(d, 0) + 1
            for d, k in need.items():
                if self._holders.get(d, 0) < k:
                    raise ValueError(f"device {d!r} released but not held")
            for d, k in need.items():
                self._holders[d] -= k

    def free_count(self) -> int:
        """How many devices could be handed to a new holder right now."""
        with self._lock:
            return sum(1 for d in self.devices if self.slots is None or self._holders[d] < self.slots)

    def in_use(self) -> dict[str, int]:
        """Holders per device right now."""
        with self._lock:
            return dict(self._holders)

    def env(self, devs: Iterable[str]) -> dict[str, str]:
        """:func:`device_env` for ``devs``; ``{}`` for a GPU-less task when the pool is empty."""
        devs = list(devs)
        if not devs and not self.devices:
            return {}
        return device_env(devs, self.vendor)

"""Whether a real batch scheduler answers here (the cluster tests and the README's cluster snippet).

``../shared/ci/slurm-up.sh`` and ``sge-up.sh`` start them; ``.ci/run`` does so before the tests.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path


def responds(argv: list[str]) -> bool:
    if not shutil.which(argv[0]):
        return False
    try:
        return subprocess.run(argv, capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


SGE_ENV = {"SGE_ROOT": "/var/lib/gridengine", "SGE_CELL": "default"}


@functools.cache
def slurm_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    # a down controller makes sinfo retry for ~10 s: knock on its port first
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    text = conf.read_text() if conf.is_file() else ""
    m = re.search(r"^\s*SlurmctldHost\s*=\s*([^\s(]+)(?:\(([^)]+)\))?", text, re.M | re.I)
    if m:
        port = re.search(r"^\s*SlurmctldPort\s*=\s*(\d+)", text, re.M | re.I)
        try:
            socket.create_connection(
                (m.group(2) or m.group(1), int(port.group(1)) if port else 6817), 1
            ).close()
        except OSError:
            return False
    return responds(["sinfo", "-h"])


@functools.cache
def sge_up() -> bool:
    return responds(["env", *(f"{k}={v}" for k, v in SGE_ENV.items()), "qstat"])

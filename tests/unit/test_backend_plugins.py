"""A backend a third-party package registers appears by name in the API and the CLI.

The package is real: a module and a ``.dist-info`` with an ``entry_points.txt`` on PYTHONPATH,
which ``importlib.metadata`` finds as it would an installed distribution.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cli_lib import PF

PLUGIN = '''
from pipefarm.backends.sequential import SequentialBackend


class EchoBackend(SequentialBackend):
    """Runs tasks one by one, as sequential does, and says which address it was given."""

    def __init__(self, workers=None, address=None, **options):
        super().__init__(workers, **options)
        print(f"echo backend at {address}", flush=True)
'''


def _install_plugin(root: Path) -> dict[str, str]:
    root.mkdir()
    (root / "pfecho.py").write_text(PLUGIN)
    info = root / "pfecho-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pfecho\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[pipefarm.backends]\necho = pfecho:EchoBackend\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    return env


def test_a_registered_backend_runs_by_name_from_the_cli(tmp_path: Path) -> None:
    env = _install_plugin(tmp_path / "site")
    run = tmp_path / "r"
    subprocess.run([*PF, "submit", str(run), "--", "echo", "{}", ":::", "a", "b", "c"],
                   check=True, env=env, capture_output=True, timeout=60)
    help_text = subprocess.run([sys.executable, "-c", "from pipefarm.backends import installed;"
                                " print(installed())"], env=env, capture_output=True, text=True,
                               check=True).stdout
    assert "echo" in help_text
    out = subprocess.run([*PF, "run", str(run), "--backend", "echo", "--address", "tcp://h:1",
                          "--no-progress"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "echo backend at tcp://h:1" in out.stdout
    status = json.loads(subprocess.run([*PF, "status", str(run), "--json"], env=env,
                                       capture_output=True, text=True, check=True).stdout)
    assert status["counts"]["succeeded"] == 3
    subprocess.run([*PF, "retry", str(run), "--ids", "1", "--force"], env=env, check=True,
                   capture_output=True, timeout=60)
    subprocess.run([*PF, "run", str(run), "--no-progress"], env=env, check=True,
                   capture_output=True, timeout=60)
    status = json.loads(subprocess.run([*PF, "status", str(run), "--json"], env=env,
                                       capture_output=True, text=True, check=True).stdout)
    assert status["backends"] == ["echo", "local"]  # where the run executed, in order
    text = subprocess.run([*PF, "status", str(run)], env=env, capture_output=True, text=True,
                          check=True).stdout
    assert "executed on: echo, local" in text


def test_an_unknown_backend_is_one_line_listing_the_installed_ones(tmp_path: Path) -> None:
    env = _install_plugin(tmp_path / "site")
    out = subprocess.run([*PF, "run", str(tmp_path / "r"), "--backend", "nope"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "unknown backend 'nope'; installed: " in out.stderr
    listed = out.stderr.split("installed: ", 1)[1].split(" (", 1)[0].strip().split(", ")
    # the plugin beside the built-in ones (whose set grows: dask, mpi), sorted
    assert {"echo", "local", "sequential"} <= set(listed) and listed == sorted(listed), listed
    assert len(out.stderr.strip().splitlines()) == 1


def test_address_is_refused_for_backends_on_this_host(tmp_path: Path) -> None:
    out = subprocess.run([*PF, "run", str(tmp_path / "r"), "--backend", "local", "--address",
                          "x"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--address" in out.stderr

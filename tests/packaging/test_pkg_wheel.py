"""The wheel and the sdist: built by ``python -m build`` (as ``make dist`` does), ``twine check``
clean, their metadata pyproject.toml's, and the wheel installed into a clean venv runs
``pipefarm --version`` and 100 tasks."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser

import pack_lib
import pytest
from packaging.requirements import Requirement

SCRIPT = """
import pipefarm as pf

def square(x):
    return x * x

if __name__ == "__main__":
    run = pf.Run.create("runs/hundred")
    ids = run.map(square, range(100), retries=1)
    run.execute(workers=2)
    assert run.status()["succeeded"] == 100, run.status()
    print("sum", sum(run.result(i) for i in ids))
    print("from", pf.__file__)
"""


@pytest.mark.slow
def test_wheel_and_sdist_pass_twine_check_and_carry_pyprojects_metadata():
    sdist, wheel = pack_lib.dist()
    p = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(sdist),
                        str(wheel)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr

    with zipfile.ZipFile(wheel) as z:
        info = f"pipefarm-{pack_lib.version()}.dist-info"
        meta = Parser().parsestr(z.read(f"{info}/METADATA").decode())
        entry_points = z.read(f"{info}/entry_points.txt").decode()
    assert meta["Version"] == pack_lib.version()
    requires = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    runtime = {str(r) for r in requires if r.marker is None}
    assert runtime == {str(r) for r in pack_lib.requirements()}
    for extra in pack_lib.EXTRAS:
        got = {r.name for r in requires if r.marker and r.marker.evaluate({"extra": extra})}
        assert got == {r.name for r in pack_lib.requirements(extra)}, extra
    assert "pipefarm = pipefarm.cli:main" in entry_points
    assert "[pipefarm.backends]" in entry_points and "mpi = " in entry_points

    with tarfile.open(sdist) as t:
        names = t.getnames()
        pkg_info = t.extractfile(f"pipefarm-{pack_lib.version()}/PKG-INFO").read().decode()
    assert f"pipefarm-{pack_lib.version()}/src/pipefarm/__init__.py" in names
    assert f"\nVersion: {pack_lib.version()}\n" in pkg_info


@pytest.mark.slow
def test_wheel_in_a_clean_venv_prints_its_version_and_runs_100_tasks(tmp_path):
    _sdist, wheel = pack_lib.dist()
    wheels = pack_lib.dependency_wheels()
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)  # not this venv's python
    with pack_lib.timed("clean venv + pip install of the wheel"):
        subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120)
        # --no-index: the dependencies come from the pinned wheels, nothing else
        p = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                            "--no-index", "--find-links", str(wheels), str(wheel)],
                           capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    env = pack_lib.clean_env()
    out = subprocess.run([str(venv / "bin" / "pipefarm"), "--version"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.stdout.strip() == f"pipefarm, version {pack_lib.version()}", out
    (tmp_path / "hundred.py").write_text(SCRIPT)
    with pack_lib.timed("100-task run from the installed wheel"):
        out = subprocess.run([str(venv / "bin" / "python"), "hundred.py"], cwd=tmp_path,
                             capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"sum {sum(x * x for x in range(100))}" in out.stdout
    assert str(venv) in out.stdout  # the installed copy ran, not this tree's

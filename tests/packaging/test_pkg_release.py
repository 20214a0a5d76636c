"""One version, everywhere: ``packaging/release.py VERSION`` writes it into ``__version__`` and
every recipe, builds the sdist and writes its checksum into them; and the check every format's
test runs (``pack_lib.mismatches``) fails when pyproject.toml and a recipe disagree. Run on a
copy of this tree."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pack_lib
import pytest

FORMATS = ("easybuild", "spack", "conda", "guix")


def copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("src", "packaging"):
        shutil.copytree(pack_lib.ROOT / name, root / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(pack_lib.ROOT / name, root / name)
    return root


def test_this_trees_recipes_agree_with_pyproject():
    assert [m for fmt in FORMATS for m in pack_lib.mismatches(fmt)] == []


def test_readme_names_this_version():
    readme = (pack_lib.ROOT / "README.md").read_text()
    assert set(re.findall(r"pipefarm:([0-9][\w.]*)", readme)) == {pack_lib.version()}
    assert set(re.findall(r"pipefarm-([0-9][\w.]*)-py3", readme)) == {pack_lib.version()}


def test_every_recipe_pins_the_same_sdist():
    digests = {fmt: pack_lib.read_recipe(fmt).sha256 for fmt in FORMATS}
    guix = digests.pop("guix")
    assert len(set(digests.values())) == 1, digests
    (hexdigest,) = set(digests.values())
    assert pack_lib.release.nix_base32(bytes.fromhex(hexdigest)) == guix


@pytest.mark.slow
def test_a_release_flows_into_every_recipe(tmp_path):
    root = copy_tree(tmp_path)
    sdist, digest = pack_lib.release.release(root, "9.8.7")
    assert pack_lib.version(root) == "9.8.7"
    assert [m for fmt in FORMATS for m in pack_lib.mismatches(fmt, root)] == []
    for fmt in ("easybuild", "spack", "conda"):
        assert pack_lib.read_recipe(fmt, root).sha256 == digest == pack_lib.release.sha256_of(
            sdist)
    assert pack_lib.read_recipe("guix", root).sha256 == pack_lib.release.nix_base32(
        bytes.fromhex(digest))
    assert (root / "packaging" / "easybuild" / "pipefarm-9.8.7.eb").is_file()
    docker = (root / "packaging" / "docker" / "Dockerfile").read_text()
    assert "ARG VERSION=9.8.7" in docker and f"ARG VERSION={pack_lib.version()}" not in docker
    assert "From: pipefarm:9.8.7" in (root / "packaging" / "apptainer" / "pipefarm.def").read_text()
    readme = (root / "README.md").read_text()
    assert "pipefarm-9.8.7-py3-none-any.whl" in readme and "pipefarm:9.8.7" in readme
    assert f"pipefarm:{pack_lib.version()}" not in readme
    spack = pack_lib.read_spack(root)
    # Spack keeps the versions released before, newest first
    assert [v.version for v in spack.versions] == ["9.8.7", pack_lib.version()]
    # pipefarm --version of that tree says it too
    out = subprocess.run([sys.executable, "-m", "pipefarm", "--version"], capture_output=True,
                         text=True, timeout=60,
                         env=pack_lib.clean_env(PYTHONPATH=str(root / "src")))
    assert out.stdout.strip() == "pipefarm, version 9.8.7", out


def test_a_version_written_in_one_place_only_fails_every_recipe(tmp_path):
    root = copy_tree(tmp_path)
    init = root / "src" / "pipefarm" / "__init__.py"
    init.write_text(init.read_text().replace(f'"{pack_lib.version()}"', '"9.9.9"', 1))
    for fmt in FORMATS:
        assert any("version" in m and "9.9.9" in m for m in pack_lib.mismatches(fmt, root)), fmt


def test_a_dependency_added_to_pyproject_only_fails_every_recipe(tmp_path):
    root = copy_tree(tmp_path)
    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace(
        'dependencies = [\n', 'dependencies = [\n  "tqdm>=4.60",\n', 1))
    for fmt in FORMATS:
        assert any("tqdm" in m for m in pack_lib.mismatches(fmt, root)), fmt


def test_a_narrowed_range_or_extra_fails_the_recipes_that_carry_ranges(tmp_path):
    root = copy_tree(tmp_path)
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text()
    text = text.replace('"click>=8.1"', '"click>=8.9"', 1)
    text = text.replace('mpi = ["mpi4py>=3.1"]', 'mpi = ["mpi4py>=4.0"]', 1)
    pyproject.write_text(text)
    for fmt in ("spack", "conda"):
        found = pack_lib.mismatches(fmt, root)
        assert any("click" in m for m in found) and any("mpi4py" in m for m in found), found
    # EasyBuild pins click 8.5.1, outside >=8.9
    assert any("click" in m for m in pack_lib.mismatches("easybuild", root))


def test_release_refuses_a_bad_version_and_changes_nothing(tmp_path):
    root = copy_tree(tmp_path)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    with pytest.raises(pack_lib.release.ReleaseError, match="not a release version"):
        pack_lib.release.set_version(root, "next")
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    p = subprocess.run([sys.executable, str(pack_lib.ROOT / "packaging" / "release.py"),
                        "1.0-final"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "not a release version" in p.stderr


def test_the_homepage_of_pyproject_flows_into_every_recipe(tmp_path):
    root = copy_tree(tmp_path)
    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace(
        "\n[project.scripts]", '\n[project.urls]\nHomepage = "https://pipefarm.example.org"\n'
        "\n[project.scripts]", 1))
    for fmt in FORMATS:
        assert any("homepage" in m for m in pack_lib.mismatches(fmt, root)), fmt
    pack_lib.release.set_version(root, pack_lib.version(root))
    for fmt in FORMATS:
        assert pack_lib.read_recipe(fmt, root).homepage == "https://pipefarm.example.org"
        assert pack_lib.mismatches(fmt, root) == [], fmt


def test_the_release_tag_on_head_names_the_version(tmp_path):
    root = copy_tree(tmp_path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(root)]
    subprocess.run([*git, "init", "-q"], check=True, timeout=60)
    subprocess.run([*git, "add", "pyproject.toml"], check=True, timeout=60)
    subprocess.run([*git, "commit", "-qm", "x"], check=True, timeout=60)
    with pytest.raises(pack_lib.release.ReleaseError, match="no v\\* tag"):
        pack_lib.release.version_from_tag(root)
    subprocess.run([*git, "tag", "v2.3.4"], check=True, timeout=60)
    assert pack_lib.release.version_from_tag(root) == "v2.3.4"

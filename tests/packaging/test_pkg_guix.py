"""The Guix package, read by guile (every form balanced and well formed): its version, its
sdist hash (Nix base 32) and its propagated inputs agree with pyproject.toml. Not
build-verified here (Guix is not installable): the README says so."""

from __future__ import annotations

import pack_lib

SCM = pack_lib.ROOT / "packaging" / "guix" / "pipefarm.scm"


def test_package_agrees_with_pyproject():
    assert pack_lib.mismatches("guix") == []


def test_guile_reads_the_package(tmp_path):
    g = pack_lib.guile_read(SCM)
    assert g["name"] == '("python-pipefarm")'
    assert "python-setuptools" in g["native-inputs"]


def test_guile_refuses_an_unbalanced_file(tmp_path):
    broken = tmp_path / "broken.scm"
    broken.write_text(SCM.read_text().rstrip().removesuffix("python-pipefarm").rstrip()[:-1])
    try:
        pack_lib.guile_read(broken)
    except AssertionError as e:
        assert "guile could not read" in str(e)
    else:
        raise AssertionError("guile read a file with an unclosed form")

"""The Spack package, loaded against a stand-in of Spack's directive API (``spack_standin``:
Spack is not installable here, so this checks what the file declares, not that Spack
concretizes it): versions with sha256, runtime dependencies with pyproject.toml's ranges, and
the variants +mpi +dask +ray with the extras' dependencies."""

from __future__ import annotations

import pack_lib


def test_package_agrees_with_pyproject():
    assert pack_lib.mismatches("spack") == []


def test_versions_checksums_variants_and_python():
    pkg = pack_lib.read_spack()
    assert pkg.versions[0].version == pack_lib.version()
    assert all(len(v.sha256) == 64 for v in pkg.versions)
    assert {v.name for v in pkg.variants} == set(pack_lib.EXTRAS)
    assert not any(v.default for v in pkg.variants)  # the engines are opt-in, as the extras
    python = [d for d in pkg.dependencies if d.name == "python"]
    assert [d.pep440 for d in python] == [f">={pack_lib.python_min()}"]
    assert set(python[0].types) == {"build", "run"}
    # the build back-end of pyproject.toml's [build-system]
    assert any(d.spec == "py-setuptools@77:" and d.types == ("build",)
               for d in pkg.dependencies)
    assert pkg.licenses == [pack_lib.pyproject()["license"]]

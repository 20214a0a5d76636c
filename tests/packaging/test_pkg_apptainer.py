"""The Apptainer definition, parsed by spython (Apptainer itself is not installable here, so
the definition is not build-verified: the README says so). It bootstraps from the image of
packaging/docker at this version, and runs ``pipefarm``."""

from __future__ import annotations

import pack_lib
from conftest import service_absent

DEF = pack_lib.ROOT / "packaging" / "apptainer" / "pipefarm.def"


def parse():
    try:
        from spython.main.parse.parsers import SingularityParser
    except ImportError:
        service_absent("spython is not installed (pip install 'pipefarm[packaging]')")
    return SingularityParser(str(DEF))


def test_definition_bootstraps_from_this_versions_image_and_runs_pipefarm():
    (recipe,) = parse().recipe.values()  # one stage
    assert recipe.fromHeader == f"pipefarm:{pack_lib.version()}"
    assert f"org.opencontainers.image.version {pack_lib.version()}" in recipe.labels
    assert recipe.cmd == 'exec pipefarm "$@"'
    assert recipe.test  # spython moves %test into a script of the image
    assert DEF.read_text().split("%test", 1)[1].split() == ["pipefarm", "--version"]
    assert any("/opt/pipefarm/bin" in line for line in recipe.environ)


def test_definition_converts_to_a_dockerfile():
    from spython.main.parse.writers import DockerWriter

    docker = DockerWriter(parse().recipe).convert()
    assert f"FROM pipefarm:{pack_lib.version()}" in docker
    assert "LABEL org.opencontainers.image.version" in docker

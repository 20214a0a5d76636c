# pipefarm for Spack: copy packages/py-pipefarm into a Spack repository of your site
# (`spack repo add packaging/spack` takes this directory as one), then
#   spack install py-pipefarm +mpi
# Dependencies and their ranges follow pyproject.toml (tests/packaging/ checks them against a
# stand-in of Spack's directives: Spack itself is not installed in CI).
# ruff: noqa: F403, F405 - Spack package files take its directives from this star import
from spack.package import *


class PyPipefarm(PythonPackage):
    """Run large numbers of tasks (Python functions and shell commands) in parallel, from a
    laptop to an HPC cluster, and never lose a finished result."""

    homepage = "HOMEPAGE"
    pypi = "pipefarm/pipefarm-0.1.0.tar.gz"

    license("BSD-3-Clause")

    version("0.1.0", sha256="0c15ba8e97407847982a17531381cbc62b6ed51ce81c4401bf8a215a03ff6d45")

    variant("mpi", default=False, description="The mpi backend (mpi4py)")
    variant("dask", default=False, description="The dask backend (dask.distributed)")
    variant("ray", default=False, description="The ray backend")

    depends_on("python@3.10:", type=("build", "run"))
    depends_on("py-setuptools@77:", type="build")

    with default_args(type=("build", "run")):
        depends_on("py-cloudpickle@2.2:")
        depends_on("py-msgspec@0.18:")
        depends_on("py-psutil@5.9:")
        depends_on("py-rich@13:")
        depends_on("py-pyarrow@12:")
        depends_on("py-click@8.1:")

        depends_on("py-mpi4py@3.1:", when="+mpi")
        depends_on("py-dask@2024.1:", when="+dask")
        depends_on("py-distributed@2024.1:", when="+dask")
        depends_on("py-ray@2.9:", when="+ray")

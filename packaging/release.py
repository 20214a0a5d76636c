"""Set pipefarm's version in every place it is written, from one: the release tag.

    python packaging/release.py 0.2.0     # or v0.2.0; with no argument, the v* tag on HEAD

It writes the version into ``src/pipefarm/__init__.py`` (``__version__``, the one source that
``pyproject.toml`` and ``pipefarm --version`` read), builds ``dist/pipefarm-VERSION.tar.gz`` and
the wheel (the files to publish), and writes the version and that sdist's sha256 into every
recipe under ``packaging/``. Then commit, tag ``vVERSION`` and publish the two files of dist/.
``tests/packaging/`` fails when a recipe's version or dependencies disagree with pyproject.toml.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INIT = Path("src/pipefarm/__init__.py")
EASYBUILD = Path("packaging/easybuild")
SPACK = Path("packaging/spack/packages/py-pipefarm/package.py")
CONDA = Path("packaging/conda-forge/recipe.yaml")
GUIX = Path("packaging/guix/pipefarm.scm")
DOCKERFILE = Path("packaging/docker/Dockerfile")
APPTAINER = Path("packaging/apptainer/pipefarm.def")
README = Path("README.md")  # its Install section names the wheel and the image tag

VERSION_RE = re.compile(r"^\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?$")  # PEP 440, public
NIX_ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"


class ReleaseError(Exception):
    """A release that cannot be made as asked (bad version, no tag, a recipe out of shape)."""


def nix_base32(digest: bytes) -> str:
    """``digest`` in the base-32 of Nix and Guix (``guix hash`` prints a sha256 this way)."""
    out = []
    for n in range((len(digest) * 8 - 1) // 5, -1, -1):
        bit = n * 5
        i, j = divmod(bit, 8)
        c = digest[i] >> j
        if i + 1 < len(digest):
            c |= digest[i + 1] << (8 - j)
        out.append(NIX_ALPHABET[c & 0x1F])
    return "".join(out)


def current_version(root: Path = ROOT) -> str:
    """``__version__`` as ``src/pipefarm/__init__.py`` writes it."""
    m = re.search(r'^__version__ = "([^"]+)"$', (root / INIT).read_text(), re.M)
    if not m:
        raise ReleaseError(f"{INIT}: no line __version__ = \"...\"")
    return m.group(1)


def homepage(root: Path = ROOT) -> str | None:
    """pyproject.toml's ``[project.urls] Homepage``, which every recipe names (None: not set)."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    return project.get("urls", {}).get("Homepage")


def version_from_tag(root: Path = ROOT) -> str:
    """The version a ``vX.Y.Z`` tag on HEAD names."""
    p = subprocess.run(["git", "describe", "--tags", "--exact-match", "--match", "v*", "HEAD"],
                       cwd=root, capture_output=True, text=True)
    if p.returncode != 0:
        raise ReleaseError("HEAD carries no v* tag: give the version (release.py 0.2.0)")
    return p.stdout.strip()


def _sub(path: Path, pattern: str, repl: str | Callable[[re.Match[str]], str],
         count: int = 0) -> None:
    """Replace ``pattern`` in ``path``; a pattern that no longer matches is an error, so that a
    recipe edited out of the shape this script knows fails loudly instead of keeping its old
    version."""
    text = path.read_text()
    new, n = re.subn(pattern, repl, text, count=count, flags=re.M)
    if n == 0:
        raise ReleaseError(f"{path}: nothing matches {pattern!r}")
    path.write_text(new)


def set_version(root: Path, version: str, sha256: str | None = None) -> list[Path]:
    """Write ``version`` (and the sdist's ``sha256`` when given) into ``__init__.py`` and every
    recipe under ``root``; returns the files written."""
    if not VERSION_RE.match(version):
        raise ReleaseError(f"{version!r} is not a release version (e.g. 0.2.0 or 1.0rc1)")
    _sub(root / INIT, r'^__version__ = "[^"]*"$', f'__version__ = "{version}"')

    ebs = sorted((root / EASYBUILD).glob("pipefarm-*.eb"))
    if len(ebs) != 1:
        raise ReleaseError(f"{EASYBUILD}: expected one pipefarm-VERSION.eb, found {len(ebs)}")
    eb = root / EASYBUILD / f"pipefarm-{version}.eb"
    ebs[0].rename(eb)
    _sub(eb, r"^version = '[^']*'$", f"version = '{version}'")
    _sub(eb, r"^# pipefarm as an EasyBuild module: `eb pipefarm-\S+\.eb",
         f"# pipefarm as an EasyBuild module: `eb pipefarm-{version}.eb")

    spack = root / SPACK
    _sub(spack, r'pypi = "pipefarm/pipefarm-[^"]*\.tar\.gz"',
         f'pypi = "pipefarm/pipefarm-{version}.tar.gz"')
    if sha256:
        # Spack keeps every released version, newest first: a re-release replaces its own line,
        # a new version goes above the others
        line = f'version("{version}", sha256="{sha256}")'
        if re.search(rf'^ *version\("{re.escape(version)}",', spack.read_text(), re.M):
            _sub(spack, rf'version\("{re.escape(version)}", .*\)$', line)
        else:
            _sub(spack, r'^( *)(version\(")', rf"\1{line}\n\1\2", count=1)

    _sub(root / CONDA, r'^  version: "[^"]*"$', f'  version: "{version}"')
    _sub(root / GUIX, r'\(version "[^"]*"\)', f'(version "{version}")')
    _sub(root / DOCKERFILE, r"^ARG VERSION=\S+$", f"ARG VERSION={version}")
    _sub(root / DOCKERFILE, r"pipefarm:[0-9]\S*", f"pipefarm:{version}")
    _sub(root / APPTAINER, r"pipefarm:[0-9]\S*", f"pipefarm:{version}")
    _sub(root / APPTAINER, r"(org\.opencontainers\.image\.version) \S+", rf"\1 {version}")
    _sub(root / README, r"pipefarm-[0-9][\w.]*-py3-none-any\.whl",
         f"pipefarm-{version}-py3-none-any.whl")
    _sub(root / README, r"pipefarm:[0-9][\w.]*", f"pipefarm:{version}")

    home = homepage(root)
    if home:
        _sub(eb, r"^homepage = '[^']*'$", f"homepage = '{home}'")
        _sub(spack, r'^( *homepage = )"[^"]*"$', rf'\1"{home}"')
        _sub(root / CONDA, r"^  homepage: \S+$", f"  homepage: {home}")
        _sub(root / GUIX, r'\(home-page "[^"]*"\)', f'(home-page "{home}")')

    if sha256:
        # the EasyBuild bundle's last extension is pipefarm itself: (name, version, {...})
        _sub(eb, r"(\(name, version, \{[^}]*'checksums': \[')[^']*(')", rf"\g<1>{sha256}\2")
        _sub(root / CONDA, r"^  sha256: \S+$", f"  sha256: {sha256}")
        _sub(root / GUIX, r'\(base32 "[^"]*"\)',
             f'(base32 "{nix_base32(bytes.fromhex(sha256))}")')
    return [root / INIT, eb, spack, root / CONDA, root / GUIX, root / DOCKERFILE,
            root / APPTAINER, root / README]


def build_dist(root: Path, out: Path) -> tuple[Path, Path]:
    """Build the sdist and the wheel of ``root`` into ``out``; returns ``(sdist, wheel)``."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out)]
    try:  # without build isolation where the back-end is already here: no index needed
        import setuptools

        if int(setuptools.__version__.split(".")[0]) >= 77:
            cmd.append("--no-isolation")
    except ImportError:
        pass
    p = subprocess.run([*cmd, str(root)], capture_output=True, text=True)
    if p.returncode != 0:
        raise ReleaseError(f"python -m build failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    version = current_version(root)
    sdist = out / f"pipefarm-{version}.tar.gz"
    wheel = out / f"pipefarm-{version}-py3-none-any.whl"
    for f in (sdist, wheel):
        if not f.is_file():
            raise ReleaseError(f"python -m build did not write {f}")
    return sdist, wheel


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def release(root: Path, version: str) -> tuple[Path, str]:
    """Set ``version`` everywhere, build dist/, write the sdist's checksum into the recipes;
    returns ``(sdist, sha256)``."""
    set_version(root, version)
    sdist, _wheel = build_dist(root, root / "dist")
    digest = sha256_of(sdist)
    set_version(root, version, digest)
    return sdist, digest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Set pipefarm's version in __init__.py and every recipe of packaging/, "
                    "build dist/ and write the sdist's sha256 into the recipes.",
        epilog="example: python packaging/release.py 0.2.0 && git commit -am 'release 0.2.0' "
               "&& git tag v0.2.0")
    parser.add_argument("version", nargs="?",
                        help="the new version (0.2.0 or v0.2.0); default: the v* tag on HEAD")
    args = parser.parse_args(argv)
    try:
        version = (args.version or version_from_tag(ROOT)).removeprefix("v")
        sdist, digest = release(ROOT, version)
    except ReleaseError as e:
        print(f"release.py: {e}", file=sys.stderr)
        return 2
    print(f"pipefarm {version}: {sdist.relative_to(ROOT)} sha256 {digest}; recipes updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())

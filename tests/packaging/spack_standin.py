"""A stand-in for the part of Spack's package API that ``py-pipefarm/package.py`` uses.

Spack is not installable here (its repository is too large to fetch), so this is NOT Spack: it
is a small module installed as ``spack.package`` while the recipe loads, whose directives
(``version``, ``variant``, ``depends_on``, ``license``, ``default_args``) record what the class
body declares, with the signatures and defaults of Spack's own (``depends_on``'s type defaults to
``("build", "link")``). What it cannot check: that the dependencies exist in Spack's builtin
repository under these names, and that ``spack install`` concretizes them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

from packaging.version import Version as _PV


@dataclass
class Version:
    version: str
    sha256: str


@dataclass
class Variant:
    name: str
    default: bool
    description: str


@dataclass
class Dependency:
    """One ``depends_on``; ``pep440`` is its version range written the PEP 440 way."""

    spec: str
    types: tuple[str, ...]
    when: str | None

    @property
    def name(self) -> str:
        return re.split(r"[@+~ ]", self.spec, maxsplit=1)[0]

    @property
    def pep440(self) -> str:
        m = re.fullmatch(r"[\w-]+(?:@([\w.]*)(:?)([\w.]*))?", self.spec)
        assert m, f"spec {self.spec!r}: the stand-in reads NAME, NAME@X:, NAME@X:Y and NAME@X"
        low, colon, high = m.groups()
        if low is None:
            return ""
        if not colon:
            return f"=={low}"
        parts = ([f">={low}"] if low else []) + ([f"<={high}"] if high else [])
        return ",".join(sorted(parts))


class _Recorder:
    def __init__(self) -> None:
        self.versions: list[Version] = []
        self.variants: list[Variant] = []
        self.dependencies: list[Dependency] = []
        self.licenses: list[str] = []
        self.defaults: list[dict] = []


_rec = _Recorder()


def version(ver: str, sha256: str | None = None, **_kwargs) -> None:
    assert sha256, f"version {ver!r} without sha256 (Spack refuses unchecksummed versions)"
    _rec.versions.append(Version(ver, sha256))


def variant(name: str, default: bool = False, description: str = "", **_kwargs) -> None:
    _rec.variants.append(Variant(name, default, description))


def depends_on(spec: str, when: str | None = None, type: tuple[str, ...] | str | None = None,
               **_kwargs) -> None:
    merged: dict = {}
    for d in _rec.defaults:
        merged.update(d)
    if type is None:
        type = merged.get("type", ("build", "link"))
    if when is None:
        when = merged.get("when")
    _rec.dependencies.append(Dependency(spec, (type,) if isinstance(type, str) else tuple(type),
                                        when))


def license(expr: str, **_kwargs) -> None:  # noqa: A001 - Spack's own name
    _rec.licenses.append(expr)


@contextlib.contextmanager
def default_args(**kwargs):
    _rec.defaults.append(kwargs)
    try:
        yield
    finally:
        _rec.defaults.pop()


class PackageBase:
    """Collects the directives of the class body into class attributes (Spack's metaclass does
    this for real)."""

    versions: list[Version]
    variants: list[Variant]
    dependencies: list[Dependency]
    licenses: list[str]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        global _rec
        # Spack orders versions newest first whatever the file's order
        cls.versions = sorted(_rec.versions, key=lambda v: _PV(v.version), reverse=True)
        cls.variants, cls.dependencies, cls.licenses = (_rec.variants, _rec.dependencies,
                                                        _rec.licenses)
        _rec = _Recorder()


class PythonPackage(PackageBase):
    pass


def load_package(path: Path) -> type[PackageBase]:
    """Import ``path`` with this stand-in as ``spack.package``; returns its package class."""
    api = types.ModuleType("spack.package")
    names = ["version", "variant", "depends_on", "license", "default_args", "PythonPackage"]
    for name in names:
        setattr(api, name, globals()[name])
    api.__all__ = names
    spack = types.ModuleType("spack")
    spack.package = api
    saved = {k: sys.modules.get(k) for k in ("spack", "spack.package")}
    sys.modules.update({"spack": spack, "spack.package": api})
    try:
        spec = importlib.util.spec_from_file_location("spack_pkg_py_pipefarm", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    classes = [v for v in vars(mod).values()
               if isinstance(v, type) and issubclass(v, PackageBase) and v is not PythonPackage]
    assert len(classes) == 1, f"{path}: one package class expected, found {classes}"
    return classes[0]

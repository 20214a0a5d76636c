"""What the packaging tests share: pyproject.toml's facts, one reader per recipe format (each
returns a :class:`Recipe` in PyPI terms, so that one comparison serves every format), and the
artifacts built once per test session (the wheel and sdist, the wheels of the dependencies).

Each reader takes the repository root, so that ``test_pkg_release.py`` can read the recipes of a
copy whose version it bumped.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from conftest import service_absent
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[2]
EXTRAS = ("mpi", "dask", "ray")  # the engines' extras every recipe offers (issue 13)
CONDA_SCHEMA = ROOT.parent / "shared" / "packaging" / "conda-recipe-schema.json"

#: seconds each real build took in this session, printed at the end of the packaging tests
TIMINGS: dict[str, float] = {}


def _load_release():
    spec = importlib.util.spec_from_file_location("pipefarm_release", ROOT / "packaging" /
                                                  "release.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses and typing resolve names through sys.modules
    spec.loader.exec_module(mod)
    return mod


#: packaging/release.py: the code that writes versions and checksums, imported by path
release = _load_release()


# --- pyproject.toml ------------------------------------------------------------------------------
def pyproject(root: Path = ROOT) -> dict:
    """``pyproject.toml``'s ``[project]`` table."""
    return tomllib.loads((root / "pyproject.toml").read_text())["project"]


def version(root: Path = ROOT) -> str:
    """The package's version (``__version__``, which pyproject.toml reads)."""
    return release.current_version(root)


def requirements(extra: str | None = None, root: Path = ROOT) -> list[Requirement]:
    """The runtime dependencies, or those an extra adds."""
    proj = pyproject(root)
    raw = proj["dependencies"] if extra is None else proj["optional-dependencies"][extra]
    return [Requirement(r) for r in raw]


def python_min(root: Path = ROOT) -> str:
    """The lowest Python ``requires-python`` admits, e.g. ``3.10``."""
    m = re.fullmatch(r">=\s*(\d+\.\d+)", pyproject(root)["requires-python"].strip())
    assert m, "requires-python is not of the form >=X.Y"
    return m.group(1)


def closure(names: list[str]) -> set[str]:
    """``names`` and everything they require at run time, from the installed metadata (a
    name not installed here counts, without what it would require)."""
    seen: set[str] = set()
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:  # not installed here: its own needs are unknown
            continue
        for raw in requires:
            req = Requirement(raw)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


# --- one reader per format -----------------------------------------------------------------------
@dataclass
class Recipe:
    """A recipe in PyPI terms: its version, the sdist checksum it pins, and its dependencies as
    ``{ecosystem name: PEP 440 specifier}`` (``""``: any version) for the runtime and per extra."""

    version: str
    sha256: str
    deps: dict[str, str]
    extras: dict[str, dict[str, str]] = field(default_factory=dict)
    homepage: str = ""


def spec_text(req: Requirement) -> str:
    """A requirement's specifier, normalised (``>=2.2``)."""
    return ",".join(sorted(str(s) for s in req.specifier))


def easybuild_config(root: Path = ROOT) -> tuple[Path, dict]:
    """The one ``pipefarm-*.eb`` and its parameters, read by EasyBuild's own parser."""
    try:
        from easybuild.framework.easyconfig.parser import EasyConfigParser
    except ImportError:
        service_absent("EasyBuild is not installed (pip install 'pipefarm[packaging]')")
    ebs = sorted((root / "packaging" / "easybuild").glob("pipefarm-*.eb"))
    assert len(ebs) == 1, f"one pipefarm-VERSION.eb expected, found {ebs}"
    return ebs[0], EasyConfigParser(str(ebs[0])).get_config_dict()


def read_spack(root: Path = ROOT):
    """Load ``package.py`` against a stand-in of Spack's directive API (Spack is not installed
    here): ``spack.package`` is a small module of ours that records what the class body
    declares. Returns the package class, with ``versions``, ``variants`` and ``dependencies``."""
    from spack_standin import load_package

    return load_package(root / "packaging" / "spack" / "packages" / "py-pipefarm" / "package.py")


def guile_read(path: Path) -> dict:
    """The Guix package's name, version, hash and propagated inputs, read by guile itself."""
    if shutil.which("guile") is None:
        service_absent("guile is not installed (apt-get install guile-3.0)")
    # guile reads every form (an unbalanced or malformed file fails here), then walks the
    # package form for the fields the test compares
    program = r"""
(define (find-field tree key)
  (cond ((not (pair? tree)) #f)
        ((eq? (car tree) key) tree)
        (else (or (find-field (car tree) key) (find-field (cdr tree) key)))))
(define forms
  (call-with-input-file (cadr (command-line))
    (lambda (port)
      (let loop ((form (read port)) (acc '()))
        (if (eof-object? form) (reverse acc) (loop (read port) (cons form acc)))))))
(define pkg (find-field forms 'package))
(for-each
 (lambda (key)
   (let ((f (find-field pkg key)))
     (write (list key (if f (cdr f) #f))) (newline)))
 '(name version base32 propagated-inputs native-inputs home-page))
"""
    p = subprocess.run(["guile", "--no-auto-compile", "-c", program, str(path)],
                       capture_output=True, text=True, timeout=60)
    # guile -c puts the script's arguments after argv[0]: (command-line) is ("guile" PATH)
    assert p.returncode == 0, f"guile could not read {path}:\n{p.stderr[-2000:]}"
    out = {}
    for line in p.stdout.splitlines():
        key, _, rest = line[1:-1].partition(" ")
        out[key] = rest
    return out


def _scheme_strings(text: str) -> list[str]:
    return re.findall(r'"([^"]*)"', text)


def _scheme_symbols(text: str) -> list[str]:
    return re.findall(r"[a-z][\w.-]*", text)


def read_recipe(fmt: str, root: Path = ROOT) -> Recipe:
    """Read the ``fmt`` recipe (easybuild, spack, conda, guix) under ``root``."""
    if fmt == "easybuild":
        _path, cfg = easybuild_config(root)
        exts = {canonicalize_name(n): f"=={v}" for n, v, *_ in cfg["exts_list"]
                if n not in ("pipefarm", "%(name)s")}
        own = [opts for n, _v, opts in cfg["exts_list"] if n == cfg["name"]]
        return Recipe(cfg["version"], own[0]["checksums"][0] if own else "", exts,
                      homepage=cfg["homepage"])
    if fmt == "spack":
        pkg = read_spack(root)
        newest = pkg.versions[0]
        deps: dict[str, str] = {}
        extras: dict[str, dict[str, str]] = {}
        for dep in pkg.dependencies:
            if "run" not in dep.types or dep.name == "python":
                continue
            into = extras.setdefault(dep.when.lstrip("+"), {}) if dep.when else deps
            into[dep.name] = dep.pep440
        return Recipe(newest.version, newest.sha256, deps, extras, pkg.homepage)
    if fmt == "conda":
        import yaml

        doc = yaml.safe_load((root / "packaging" / "conda-forge" / "recipe.yaml").read_text())

        def table(lines: list[str]) -> dict[str, str]:
            out = {}
            for line in lines:
                name, _, spec = line.partition(" ")
                out[name] = spec.replace(" ", "")
            return out

        req = doc["requirements"]
        return Recipe(doc["context"]["version"], doc["source"]["sha256"], table(req["run"]),
                      {"*": table(req.get("run_constraints", []))}, doc["about"]["homepage"])
    if fmt == "guix":
        g = guile_read(root / "packaging" / "guix" / "pipefarm.scm")
        inputs = _scheme_symbols(g["propagated-inputs"])
        return Recipe(_scheme_strings(g["version"])[0], _scheme_strings(g["base32"])[0],
                      {name: "" for name in inputs if name != "list"},
                      homepage=_scheme_strings(g["home-page"])[0])
    raise ValueError(fmt)


def expected(fmt: str, root: Path = ROOT) -> Recipe:
    """What the ``fmt`` recipe must say, derived from pyproject.toml (checksum left empty)."""
    names = ECOSYSTEM_NAMES[fmt]

    def table(reqs: list[Requirement], versions: bool = True) -> dict[str, str]:
        out = {}
        for r in reqs:
            for name in names(r):
                out[name] = spec_text(r) if versions else ""
        return out

    if fmt == "conda":
        run = table(requirements(root=root))
        run["python"] = ">=${{python_min}}"
        constraints: dict[str, str] = {}
        for extra in EXTRAS:
            constraints.update(table(requirements(extra, root)))
        return Recipe(version(root), "", run, {"*": constraints})
    if fmt == "guix":
        return Recipe(version(root), "", table(requirements(root=root), versions=False))
    extras = {e: table(requirements(e, root)) for e in EXTRAS}
    return Recipe(version(root), "", table(requirements(root=root)), extras)


def mismatches(fmt: str, root: Path = ROOT) -> list[str]:
    """Every way the ``fmt`` recipe disagrees with pyproject.toml, one line each ([] if none):
    its version, its sdist checksum's form, its runtime dependencies and their ranges, and
    (where the format has them) the mpi, dask and ray extras. EasyBuild pins exact versions:
    each must satisfy pyproject's range, and its extensions must be exactly the runtime
    dependencies and what they need in turn."""
    got, want = read_recipe(fmt, root), expected(fmt, root)
    out = []
    home = release.homepage(root)
    if home and got.homepage != home:
        out.append(f"{fmt}: homepage {got.homepage!r}, pyproject says {home!r}")
    if got.version != want.version:
        out.append(f"{fmt}: version {got.version}, pyproject says {want.version}")
    checksum = r"[0-9a-df-np-sv-z]{52}" if fmt == "guix" else r"[0-9a-f]{64}"
    if not re.fullmatch(checksum, got.sha256):
        out.append(f"{fmt}: the sdist's checksum {got.sha256!r} is not a sha256")
    if fmt == "easybuild":
        for name, spec in want.deps.items():
            pin = got.deps.get(name)
            if pin is None:
                out.append(f"easybuild: no extension {name} (pyproject: {name}{spec})")
            elif not Requirement(f"{name}{spec}").specifier.contains(pin[2:], prereleases=True):
                out.append(f"easybuild: {name} {pin[2:]} is outside pyproject's {spec}")
        needed = closure(list(want.deps))
        if set(got.deps) != needed:
            out.append(f"easybuild: extensions {sorted(got.deps)}, the runtime dependencies "
                       f"and theirs are {sorted(needed)}")
        return out
    for label, g, w in [("dependencies", got.deps, want.deps),
                        *[(f"extra {e}", got.extras.get(e, {}), w) for e, w in
                          want.extras.items()]]:
        for name in sorted(set(g) | set(w)):
            if g.get(name) != w.get(name):
                out.append(f"{fmt}: {label}: {name} {g.get(name, 'absent')!r}, pyproject says "
                           f"{w.get(name, 'absent')!r}")
    return out


def _spack_names(r: Requirement) -> list[str]:
    return [f"py-{canonicalize_name(n)}" for n in (r.name, *sorted(r.extras))]


def _conda_names(r: Requirement) -> list[str]:
    # conda-forge splits these PyPI names: dask[distributed] is dask-core + distributed; the
    # plain `ray` wheel (no extras) is ray-core
    split = {"dask": ["dask-core"], "ray": ["ray-core"]}
    return split.get(canonicalize_name(r.name), [canonicalize_name(r.name)]) + sorted(r.extras)


def _guix_names(r: Requirement) -> list[str]:
    return [f"python-{canonicalize_name(r.name)}"]


ECOSYSTEM_NAMES = {"spack": _spack_names, "conda": _conda_names, "guix": _guix_names,
                   "easybuild": lambda r: [canonicalize_name(r.name)]}


# --- artifacts built once per session ------------------------------------------------------------
@functools.cache
def session_dir() -> Path:
    """A directory for this test session's builds (removed when the session ends)."""
    d = Path(tempfile.mkdtemp(prefix="pipefarm-packaging-"))
    import atexit

    atexit.register(shutil.rmtree, d, True)
    return d


def timed(name: str):
    """Record how long the block took in :data:`TIMINGS` under ``name``."""

    class _Timer:
        def __enter__(self):
            self.t0 = time.monotonic()

        def __exit__(self, *exc):
            TIMINGS[name] = round(time.monotonic() - self.t0, 1)
            print(f"\n[packaging] {name}: {TIMINGS[name]} s", file=sys.stderr)

    return _Timer()


@functools.cache
def dist() -> tuple[Path, Path]:
    """``(sdist, wheel)`` of this tree, built once per session (as ``make dist`` builds them)."""
    if importlib.util.find_spec("build") is None:
        service_absent("the build package is not installed (pip install 'pipefarm[dist]')")
    with timed("python -m build (sdist + wheel)"):
        return release.build_dist(ROOT, session_dir() / "dist")


@functools.cache
def dependency_wheels() -> Path:
    """The wheels the EasyBuild recipe pins (pipefarm's runtime dependencies for this Python),
    downloaded once per session by pip from the configured package index; EasyBuild checks
    each against the recipe's checksum, and the container and clean-venv tests install from
    them with ``--no-index``."""
    _path, cfg = easybuild_config()
    out = session_dir() / "wheels"
    out.mkdir(exist_ok=True)
    pins = [f"{n}=={v}" for n, v, *_ in cfg["exts_list"] if n != cfg["name"]]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--dest", str(out), *pins]
    with timed("pip download of the pinned dependency wheels"):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        service_absent(f"pip could not download the pinned wheels: {p.stderr[-1500:]}")
    return out


def clean_env(**extra: str) -> dict[str, str]:
    """An environment without this tree on PYTHONPATH or this venv on PATH, so that what runs
    is the installed package and nothing else."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p != venv_bin)
    env.update(extra)
    return env


def require_tools(*names: str) -> None:
    """Each named command is on PATH, or the test is skipped (failed in CI)."""
    for name in names:
        if shutil.which(name) is None:
            service_absent(f"{name} is not installed (see .ci/run)")


#: a small run, as a user types it: 20 command tasks on 2 workers, then the counts as JSON
SMALL_RUN = ("pipefarm submit runs/smoke --array 0-19 -- echo {index} && "
             "pipefarm run runs/smoke --workers 2 && pipefarm status runs/smoke --json")


def assert_small_run(stdout: str) -> None:
    """The output of :data:`SMALL_RUN` says every one of its 20 tasks succeeded."""
    assert '"succeeded": 20' in stdout and '"failed": 0' in stdout, stdout[-2000:]

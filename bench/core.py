"""The harness: workload registry, isolated measurements, rows, Markdown and JSON output.

A **workload** is a function ``run(ctx) -> list[Row]`` registered with :func:`workload`; the
modules in ``bench/workloads/`` are imported automatically, so a new workload is one new module.

A **measurement** is one call of a ``module:function`` in a fresh ``python -m bench.child``
subprocess, in its own session. When it ends (or times out) every process it started is killed,
so Dask's and Ray's helpers never disturb the next measurement. :meth:`Context.measure` runs
several systems for several repeats, interleaved (A B C A B C ...), so that a noisy neighbour
hurts every system alike; the workload takes the median of the repeats.

A **row** is one number: ``{workload, system, metric, value, unit, ratio_vs, target, met}`` plus
``n`` (tasks), ``note``, ``samples`` (the repeats) and ``na`` (why there is no value). On a peer's
row ``ratio_vs`` is pipefarm's value of the same metric divided by the peer's.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pkgutil
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository
RESULTS = Path(__file__).resolve().parent / "results"

# --- rows -----------------------------------------------------------------------------------------

#: Which way is good, by unit (a workload may say otherwise on its rows).
BETTER = {"tasks/s": "higher", "%": "higher", "s": "lower", "ms": "lower", "B/task": "lower"}


@dataclass
class Row:
    workload: str
    system: str
    metric: str
    value: float | None
    unit: str
    ratio_vs: float | None = None  # pipefarm / this system, same metric (peer rows only)
    target: str | None = None
    met: bool | None = None
    n: int | None = None
    note: str | None = None
    samples: list[float] = field(default_factory=list)
    na: str | None = None  # why there is no value ("not installed", a timeout, an error)
    better: str | None = None  # "higher" or "lower": which way is good for this metric

    def __post_init__(self):
        if self.better is None:
            self.better = BETTER.get(self.unit)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- workloads ------------------------------------------------------------------------------------


@dataclass
class Workload:
    id: str
    title: str
    func: Callable[[Context], list[Row]]
    quick_s: float  # rough duration with --quick (documentation, and the order of the runs)
    full_s: float


REGISTRY: dict[str, Workload] = {}


def workload(id: str, title: str, *, quick_s: float = 30, full_s: float = 120):
    """Register ``run(ctx) -> list[Row]`` as workload ``id`` (e.g. ``"W1"``)."""

    def deco(func):
        if id.upper() in REGISTRY:
            raise ValueError(f"workload {id} registered twice")
        REGISTRY[id.upper()] = Workload(id, title, func, quick_s, full_s)
        return func

    return deco


def load_workloads() -> dict[str, Workload]:
    """Import every module of ``bench.workloads``; each registers itself."""
    from . import workloads

    for info in pkgutil.iter_modules(workloads.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{workloads.__name__}.{info.name}")
    return dict(sorted(REGISTRY.items(), key=lambda kv: _wl_key(kv[0])))


def _wl_key(wid: str):
    # W1 < W2 < ... < W10 < named workloads
    if wid[:1] == "W" and wid[1:].isdigit():
        return (0, int(wid[1:]), "")
    return (1, 0, wid)


# --- measurements ---------------------------------------------------------------------------------


class Unavailable(Exception):
    """A measurement produced no value; ``reason`` says why, ``traceback`` has the details."""

    def __init__(self, reason: str, traceback: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.traceback = traceback


@dataclass
class Job:
    """One system of a workload: call ``target(**kwargs)`` in a child, ``repeats`` times."""

    label: str  # the system's name in the table ("pipefarm", "ProcessPool (chunksize=1)", ...)
    target: str  # "bench.workloads.w1_throughput:child"
    kwargs: dict = field(default_factory=dict)
    repeats: int = 1
    timeout: float = 300


@dataclass
class Measurement:
    label: str
    samples: list[dict] = field(default_factory=list)
    errors: list[Unavailable] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.samples)

    @property
    def reason(self) -> str | None:
        return self.errors[0].reason if self.errors and not self.samples else None

    def values(self, key: str | Callable[[dict], float]) -> list[float]:
        get = key if callable(key) else (lambda s: s.get(key))
        return [v for v in (get(s) for s in self.samples) if v is not None]

    def median(self, key: str | Callable[[dict], float]) -> float | None:
        vals = self.values(key)
        return statistics.median(vals) if vals else None

    def first(self, key: str, default=None):
        for s in self.samples:
            if key in s:
                return s[key]
        return default


def child_env() -> dict:
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "src")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network probe from Ray
    env.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
    env.setdefault("PYTHONWARNINGS", "ignore")
    env.pop("PYTHONSTARTUP", None)
    return env


def _descendants(pid: int) -> dict[int, float]:
    """``{pid: create_time}`` of every descendant of ``pid`` (to kill them later by identity)."""
    import psutil

    out: dict[int, float] = {}
    try:
        for p in psutil.Process(pid).children(recursive=True):
            try:
                out[p.pid] = p.create_time()
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return out


def _kill_leftovers(session: int, seen: dict[int, float], grace: float = 2.0) -> list[str]:
    """Kill what a finished child left: its session's processes and descendants we saw.

    Processes are matched by pid *and* creation time, so a recycled pid is never hit.
    """
    import psutil

    killed = []
    victims: dict[int, psutil.Process] = {}
    for pid, ctime in seen.items():
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - ctime) < 0.01:
                victims[pid] = p
        except psutil.Error:
            pass
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid != os.getpid() and os.getsid(p.pid) == session:
                victims[p.pid] = p
        except (OSError, psutil.Error):
            pass
    if not victims:
        return killed
    # helpers such as resource trackers exit by themselves once their parent is gone: a grace
    _gone, alive = psutil.wait_procs(list(victims.values()), timeout=grace)
    for p in alive:
        try:
            name = " ".join(p.cmdline()[:3])[-60:] or p.name()
            p.kill()
            killed.append(f"{name} [{p.pid}]")
        except psutil.Error:
            pass
    if alive:
        psutil.wait_procs(alive, timeout=5)
    return killed


def run_child(target: str, kwargs: dict, timeout: float, log=None) -> dict:
    """Run ``target(**kwargs)`` in a fresh child; its result dict, or raise :class:`Unavailable`."""
    with tempfile.TemporaryDirectory(prefix="pfbench-child-") as tmp:
        out = os.path.join(tmp, "out.json")
        errlog = os.path.join(tmp, "stderr.log")
        cmd = [sys.executable, "-m", "bench.child", out, target, json.dumps(kwargs)]
        with open(errlog, "wb") as ferr:
            proc = subprocess.Popen(
                cmd,
                cwd=str(ROOT),
                env={**child_env(), "PFBENCH_DUMP_AFTER": str(max(1.0, timeout - 3))},
                stdin=subprocess.DEVNULL,
                stdout=ferr,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            seen: dict[int, float] = {}
            deadline = time.monotonic() + timeout
            timed_out = False
            next_scan = time.monotonic() + 0.5
            while proc.poll() is None:
                now = time.monotonic()
                if now > deadline:
                    timed_out = True
                    seen.update(_descendants(proc.pid))
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except OSError:
                        pass
                    proc.wait()
                    break
                if now >= next_scan:  # remember descendants, to kill any that outlive the child
                    seen.update(_descendants(proc.pid))
                    next_scan = now + 1.0
                time.sleep(0.05)
        leftovers = _kill_leftovers(proc.pid, seen)
        if leftovers and log:
            log(f"    killed {len(leftovers)} leftover process(es): {', '.join(leftovers[:6])}")
        tail = _tail(errlog)
        if timed_out:
            raise Unavailable(f"timeout after {timeout:.0f} s", tail)
        try:
            with open(out) as f:
                payload = json.load(f)
        except (OSError, ValueError):
            raise Unavailable(f"child died (exit code {proc.returncode})", tail) from None
        if payload.get("ok"):
            return payload["result"]
        err = payload.get("error", "?")
        if payload.get("kind") == "unavailable":
            reason = f"not available: {err}"
        else:
            reason = f"failed: {err}"
        raise Unavailable(reason, (payload.get("traceback") or "") + ("\n" + tail if tail else ""))


def _tail(path: str, n: int = 8000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


# --- the context a workload runs in ---------------------------------------------------------------


@dataclass
class Context:
    quick: bool = False
    repeats_override: int | None = None
    systems: set[str] | None = None  # None: every system
    settle: float = 0.5  # seconds of calm after each child
    quick_timeout: float = 90  # with --quick no child may take longer than this
    verbose: bool = True
    errors: list[dict] = field(default_factory=list)
    raw: dict[str, dict[str, list[dict]]] = field(default_factory=dict)  # every sample, for JSON
    current: str = ""

    def log(self, msg: str) -> None:
        if self.verbose:
            print(msg, file=sys.stderr, flush=True)

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def reps(self, full: int, quick: int = 1) -> int:
        if self.repeats_override is not None:
            return self.repeats_override
        return quick if self.quick else full

    def wants(self, system: str) -> bool:
        """Whether ``system`` (a peers.SYSTEMS name) was selected with ``--systems``."""
        if system == "pipefarm" or system.startswith("pf-"):
            return True  # pipefarm's own rows are always run
        return self.systems is None or system in self.systems

    def measure(self, jobs: Iterable[Job]) -> dict[str, Measurement]:
        """Run ``jobs`` interleaved by repeat; return ``{label: Measurement}``.

        A system that fails its first repeat because it is unavailable is not tried again.
        """
        jobs = list(jobs)
        results = {j.label: Measurement(j.label) for j in jobs}
        for r in range(max((j.repeats for j in jobs), default=0)):
            for j in jobs:
                if r >= j.repeats:
                    continue
                m = results[j.label]
                if m.errors and (not m.samples) and "not available" in m.errors[0].reason:
                    continue
                t = time.monotonic()
                self.log(f"  [{self.current}] {j.label}: repeat {r + 1}/{j.repeats} ...")
                timeout = min(j.timeout, self.quick_timeout) if self.quick else j.timeout
                try:
                    s = run_child(j.target, j.kwargs, timeout, log=self.log)
                    m.samples.append(s)
                    self.raw.setdefault(self.current, {}).setdefault(j.label, []).append(
                        {"kwargs": j.kwargs, **s} if isinstance(s, dict) else {"value": s}
                    )
                    self.log(f"    ok in {time.monotonic() - t:.1f} s")
                except Unavailable as e:
                    m.errors.append(e)
                    self.log(f"    n/a: {e.reason}")
                    self.errors.append(
                        {
                            "workload": self.current,
                            "system": j.label,
                            "repeat": r + 1,
                            "reason": e.reason,
                            "traceback": e.traceback,
                        }
                    )
                if self.settle:
                    time.sleep(self.settle)
        return results


# --- building rows --------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def metric_rows(
    wl: str,
    ms: dict[str, Measurement],
    metric: str,
    unit: str,
    key: str | Callable[[dict], float],
    *,
    ref: str = "pipefarm",
    targets: dict[str, tuple[str, Callable[[float | None, float | None], bool | None]]]
    | None = None,
    notes: dict[str, str] | None = None,
    n_key: str = "n",
) -> list[Row]:
    """One row per measured system for ``metric`` (the median of its repeats of ``key``).

    ``targets[label] = (text, check)``: ``check(value, ratio_vs)`` says whether it is met.
    """
    targets = targets or {}
    notes = notes or {}
    refv = ms[ref].median(key) if ref in ms else None
    rows = []
    for label, m in ms.items():
        v = m.median(key)
        r = None if label == ref else ratio(refv, v)
        text, check = targets.get(label, (None, None))
        met = None
        if check is not None:
            try:
                met = check(v, r)
            except TypeError:  # a None somewhere
                met = None
        na = None
        if v is None:
            na = m.reason or "no value"
            met = False if (label == ref and text) else met
        rows.append(
            Row(
                workload=wl,
                system=label,
                metric=metric,
                value=v,
                unit=unit,
                ratio_vs=r,
                target=text,
                met=met,
                n=m.first(n_key),
                note=notes.get(label),
                samples=[round(x, 6) for x in m.values(key)],
                na=na,
            )
        )
    return rows


def at_least(x: float):
    return lambda v, r: None if v is None else v >= x


def at_most(x: float):
    return lambda v, r: None if v is None else v <= x


def ratio_at_least(x: float):
    return lambda v, r: None if r is None else r >= x


# --- output ---------------------------------------------------------------------------------------


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return ""
    if unit == "%":
        return f"{v:.1f} %"
    if unit == "tasks/s":
        return f"{v:,.0f} tasks/s"
    if unit == "s":
        return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"
    if unit == "ms":
        return f"{v:.1f} ms"
    if unit == "B/task":
        return f"{v:,.0f} B/task"
    if unit == "MiB":
        return f"{v:.1f} MiB"
    return f"{v:.4g} {unit}".strip()


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return ""
    if r >= 100:
        return f"{r:,.0f}×"
    if r >= 10:
        return f"{r:.1f}×"
    if r >= 0.1:
        return f"{r:.2f}×"
    return f"{r:.2g}×"


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def to_markdown(rows: list[Row], meta: dict) -> str:
    lines = [
        "| Workload | System | Metric | Value | pipefarm / peer | Target | Met |",
        "| --- | --- | --- | ---: | ---: | --- | :---: |",
    ]
    for r in rows:
        value = fmt_value(r.value, r.unit) if r.na is None else f"n/a ({_short(r.na)})"
        if r.n and r.na is None:
            value += f" (n={r.n:,})"
        met = {True: "✅", False: "❌", None: ""}[r.met]
        arrow = {"higher": " ↑", "lower": " ↓"}.get(r.better or "", "")
        metric = r.metric + arrow + (f" — {r.note}" if r.note else "")
        lines.append(
            f"| {r.workload} | {_cell(r.system)} | {_cell(metric)} | {_cell(value)} | "
            f"{fmt_ratio(r.ratio_vs)} | {_cell(r.target or '')} | {met} |"
        )
    head = (
        f"_{meta.get('mode', '')} run, {meta.get('date', '')}, {meta.get('cpus', '?')} CPUs "
        f"({meta.get('cpu_model', '')}), Python {meta.get('python', '')}, "
        f"load {meta.get('load_before', '?')} → {meta.get('load_after', '?')}, "
        f"{meta.get('duration_s', 0):.0f} s. Values are medians of the repeats; "
        f"pipefarm / peer is pipefarm's value divided by the peer's for the same metric "
        f"(↑: higher is better, so a ratio above 1 favours pipefarm; ↓: lower is better)._"
    )
    return head + "\n\n" + "\n".join(lines) + "\n"


def _short(reason: str, n: int = 90) -> str:
    reason = reason.splitlines()[0] if reason else ""
    return reason if len(reason) <= n else reason[: n - 1] + "…"


def machine_meta() -> dict:
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        rev = ""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "git": rev or None,
    }


def loadavg() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"

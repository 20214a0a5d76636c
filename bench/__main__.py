"""``python -m bench [--quick] [--only W1,W3] [--json out.json] [--md out.md]``

Runs the selected workloads (default: all), prints a Markdown table, and saves the rows as JSON
(default ``bench/results/latest.json``) and the table as Markdown (default
``bench/results/latest.md``). ``--render-readme`` then rewrites the benchmark block of the
top-level README.md from that Markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import core


def parse_args(argv: list[str] | None, workloads: dict) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="pipefarm's KPI benchmarks: pipefarm against its peers, in one run.",
    )
    p.add_argument(
        "--quick", action="store_true", help="small sizes, one repeat (CI smoke, ~2-3 min)"
    )
    p.add_argument(
        "--only",
        metavar="IDS",
        help=f"comma-separated workloads to run (of {', '.join(workloads)}); default all",
    )
    p.add_argument(
        "--systems",
        metavar="NAMES",
        help="comma-separated peers to run besides pipefarm (ppe, joblib, dask, ray); default all",
    )
    p.add_argument("--repeats", type=int, help="repeats per system, overriding each workload's")
    p.add_argument("--json", metavar="PATH", default=str(core.RESULTS / "latest.json"))
    p.add_argument("--md", metavar="PATH", help="Markdown output (default: --json with .md)")
    p.add_argument("--settle", type=float, default=0.5, help="seconds of calm after each child")
    p.add_argument(
        "--render-readme",
        nargs="?",
        const=str(core.ROOT / "README.md"),
        metavar="README",
        help="also rewrite the bench block of README.md (or the given file)",
    )
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    workloads = core.load_workloads()
    args = parse_args(argv, workloads)
    if args.list:
        for wl in workloads.values():
            print(f"{wl.id:8} {wl.title}  (~{wl.quick_s:.0f} s quick, ~{wl.full_s:.0f} s full)")
        return 0
    selected = list(workloads)
    if args.only:
        want = [w.strip().upper() for w in args.only.split(",") if w.strip()]
        unknown = [w for w in want if w not in workloads]
        if unknown:
            print(
                f"unknown workload(s): {', '.join(unknown)}; known: {', '.join(workloads)}",
                file=sys.stderr,
            )
            return 2
        selected = [w for w in workloads if w in want]
    systems = None
    if args.systems:
        systems = {s.strip().lower() for s in args.systems.split(",") if s.strip()}

    ctx = core.Context(
        quick=args.quick,
        repeats_override=args.repeats,
        systems=systems,
        settle=args.settle,
        verbose=not args.quiet,
    )
    meta = core.machine_meta()
    meta.update(
        mode="quick" if args.quick else "full",
        workloads=selected,
        load_before=core.loadavg(),
        argv=sys.argv[1:] if argv is None else argv,
    )
    rows: list[core.Row] = []
    started = time.monotonic()
    for wid in selected:
        wl = workloads[wid]
        ctx.current = wl.id
        ctx.log(f"== {wl.id}: {wl.title}")
        t = time.monotonic()
        try:
            rows += wl.func(ctx)
        except Exception as e:  # a broken workload must not sink the others
            import traceback

            ctx.log(f"  workload {wl.id} crashed: {e!r}")
            ctx.errors.append(
                {
                    "workload": wl.id,
                    "system": "(harness)",
                    "reason": repr(e),
                    "traceback": traceback.format_exc(),
                }
            )
            rows.append(core.Row(wl.id, "(harness)", wl.title, None, "", na=f"crashed: {e!r}"))
        ctx.log(f"   {wl.id} took {time.monotonic() - t:.0f} s")
    meta["duration_s"] = time.monotonic() - started
    meta["load_after"] = core.loadavg()

    md = core.to_markdown(rows, meta)
    print(md)
    json_path = Path(args.json)
    md_path = Path(args.md) if args.md else json_path.with_suffix(".md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "meta": meta,
        "rows": [r.to_dict() for r in rows],
        "errors": ctx.errors,
        "measurements": ctx.raw,
    }
    json_path.write_text(json.dumps(doc, indent=1, default=repr) + "\n")
    md_path.write_text(md)
    ctx.log(f"wrote {json_path} and {md_path}")
    if ctx.errors:
        ctx.log(
            f"{len(ctx.errors)} measurement(s) failed; tracebacks in {json_path} under 'errors'"
        )
    if args.render_readme:
        from .render_readme import render

        changed = render(md_path, Path(args.render_readme))
        ctx.log(f"{args.render_readme}: {'updated' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

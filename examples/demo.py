"""pipefarm demo: a parameter sweep of the logistic map's Lyapunov exponent.

For each growth rate r in [2.8, 4.0] it iterates x -> r x (1 - x) and estimates the Lyapunov
exponent: negative means the population settles into a cycle, positive means chaos. Every
result is stored in runs/demo/catalog.db as it finishes; stop it with Ctrl-C and run it again
to resume where it stopped.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

import pipefarm as pf


def lyapunov(r: float, n: int = 10_000, burn_in: int = 500) -> float:
    """Lyapunov exponent of the logistic map at growth rate r."""
    x = 0.5
    for _ in range(burn_in):
        x = r * x * (1.0 - x)
    total = 0.0
    for _ in range(n):
        x = r * x * (1.0 - x)
        total += math.log(abs(r * (1.0 - 2.0 * x)) + 1e-300)
    return total / n


def main() -> int:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 4000
    if (path / "catalog.db").exists() and "--resume" not in sys.argv:
        shutil.rmtree(path)
    run = pf.Run.create(path, exist_ok=True)
    if len(run) == 0:
        rates = [2.8 + 1.2 * i / (n - 1) for i in range(n)]
        run.map(lyapunov, rates, keys=[f"r={r:.5f}" for r in rates], retries=1, timeout=60)
    print(f"pipefarm demo: {len(run):,} tasks (Lyapunov exponent of the logistic map) in {path}/")
    t0 = time.perf_counter()
    summary = run.execute()
    elapsed = time.perf_counter() - t0
    table = run.results()
    values = [v for v in table.column("result").to_pylist() if v is not None]
    chaotic = sum(1 for v in values if v > 0)
    print()
    print(f"tasks       {summary.total:,} ({summary.succeeded:,} succeeded, {summary.failed:,} failed)")
    print(f"time        {elapsed:.2f} s with {pf.backends.LocalBackend().n} workers")
    print(f"throughput  {summary.attempts / elapsed:,.0f} tasks/s")
    print(f"science     {chaotic:,} of {len(values):,} growth rates are chaotic (exponent > 0)")
    print(f"run dir     {path.resolve()}  (try: python -c \"import pipefarm as pf; "
          f"print(pf.Run.open('{path}').results().slice(0, 5))\")")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())

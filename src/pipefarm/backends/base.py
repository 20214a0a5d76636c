"""What every backend shares: the :class:`Summary` an ``execute`` call returns.

Every backend -- ``local``, ``sequential``, ``array`` and those to come -- answers
``execute(store, ...)`` with the same :class:`Summary`, so callers (``Run.execute``, the CLI,
the benchmarks) never need to know which engine ran the tasks.
"""

from __future__ import annotations

import msgspec


class Summary(msgspec.Struct):
    """What one ``execute`` call did."""

    run: str | None
    total: int
    counts: dict[str, int]
    attempts: int  # attempts that ended during this call
    elapsed_s: float
    interrupted: bool = False
    #: Why a ``halt`` policy stopped the run (``None``: it did not), e.g.
    #: ``"3 task(s) failed (halt soon,fail=3)"``.
    halted: str | None = None

    @property
    def succeeded(self) -> int:
        return self.counts.get("succeeded", 0)

    @property
    def failed(self) -> int:
        return self.counts.get("failed", 0)

    @property
    def throughput(self) -> float:
        return self.attempts / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        """Every task succeeded."""
        return self.succeeded == self.total

    def __str__(self) -> str:
        c = self.counts
        parts = [f"{c.get('succeeded', 0):,} succeeded"]
        for k in ("failed", "skipped", "cancelled", "ready", "blocked"):
            if c.get(k):
                parts.append(f"{c[k]:,} {k}")
        head = "interrupted" if self.interrupted else "halted" if self.halted else "done"
        return (
            f"{head}: {self.total:,} tasks ({', '.join(parts)}); {self.attempts:,} attempts in"
            f" {self.elapsed_s:.2f} s ({self.throughput:,.0f}/s)"
            + (f"; run: {self.run}" if self.run else "")
        )

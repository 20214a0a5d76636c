"""What a run looks like now: counts, throughput, ETA and the latest failures (read only)."""

from __future__ import annotations

import time
from typing import Any

from ..states import State


def status_report(run: Any, window_s: float = 60.0, last_failures: int = 5) -> dict[str, Any]:
    """The status of ``run`` as a JSON-ready dict (``pipefarm status --json``)."""
    db = run.store.db
    counts = run.store.counts()
    total = sum(counts.values())
    now = time.time()
    recent = db.execute(
        f"SELECT count(*), min(ended_at) FROM tasks WHERE state IN ({int(State.SUCCEEDED)},"
        f" {int(State.FAILED)}) AND ended_at >= ?",
        (now - window_s,),
    ).fetchone()
    n_recent, first = recent
    span = (now - first) if first else 0.0
    rate = n_recent / span if n_recent and span > 0 else 0.0
    left = sum(counts[k] for k in ("blocked", "ready", "claimed", "running"))
    fails = [
        {"task_id": t, "key": k, "exit_code": code, "error": (err or "").strip().splitlines()[-1:] and
         (err or "").strip().splitlines()[-1], "ended_at": ended}
        for t, k, code, err, ended in db.execute(
            f"SELECT id, key, exit_code, error, ended_at FROM tasks WHERE state={int(State.FAILED)}"
            " ORDER BY ended_at DESC LIMIT ?",
            (last_failures,),
        )
    ]
    notes = [
        {"task_id": t, "note": note}
        for t, note in db.execute(
            "SELECT id, note FROM tasks WHERE note IS NOT NULL ORDER BY ended_at DESC LIMIT ?",
            (last_failures,),
        )
    ]
    return {
        "run": str(run.path),
        "total": total,
        "counts": counts,
        "done": counts["succeeded"] + counts["failed"] + counts["skipped"] + counts["cancelled"],
        "throughput_per_s": round(rate, 3),
        "eta_s": round(left / rate, 1) if rate > 0 and left else None,
        "last_failures": fails,
        "last_notes": notes,  # e.g. output cut at its cap
    }

"""Tasks for the checkpoint tests: they count to ``n`` saving a checkpoint at every step and log
what each attempt did, so a test can tell where a later attempt started.

An importable module (``tests/`` is on ``sys.path`` and ``PYTHONPATH``, see ``conftest.py``) so
that workers resolve them by reference.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pipefarm as pf


def _log(path: str, line: str) -> None:
    with open(path, "a") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def count_to(n: int, log: str, step_s: float = 0.0, kill_at: int = 0, hang_at: int = 0,
             fail_at: int = 0, flag: str = "") -> int:
    """Count from the last checkpoint to ``n``, saving each step; ``log`` gets ``start FROM
    PID`` and ``step I`` lines. Once (while ``flag`` does not exist) at step ``kill_at`` the
    worker SIGKILLs itself, at ``hang_at`` it hangs, at ``fail_at`` it raises."""
    i = pf.checkpoint.load(default=0)
    _log(log, f"start {i} {os.getpid()}")
    while i < n:
        i += 1
        if flag and not os.path.exists(flag) and i in (kill_at, hang_at, fail_at):
            Path(flag).touch()
            if i == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if i == hang_at:
                time.sleep(600)
            raise RuntimeError(f"failing at step {i} on purpose")
        _log(log, f"step {i}")
        pf.checkpoint.save(i)
        if step_s:
            time.sleep(step_s)
    return i


def attempts_in(log: str) -> list[tuple[int, list[int]]]:
    """Each attempt in ``log``: the step it started from and the steps it did."""
    out: list[tuple[int, list[int]]] = []
    for line in Path(log).read_text().splitlines():
        word, value = line.split()[:2]
        if word == "start":
            out.append((int(value), []))
        else:
            out[-1][1].append(int(value))
    return out


#: A command task that counts to 20 in $PIPEFARM_CHECKPOINT_DIR/i (written by rename), logging
#: like :func:`count_to`; $1 is the log, $2 the seconds per step.
COUNT_SH = r"""
d="$PIPEFARM_CHECKPOINT_DIR"
[ -d "$d" ] || { echo "no checkpoint directory: '$d'" >&2; exit 3; }
i=$(cat "$d/i" 2>/dev/null || echo 0)
echo "start $i $$" >> "$1"
while [ "$i" -lt 20 ]; do
  i=$((i + 1))
  echo "step $i" >> "$1"
  echo "$i" > "$d/i.tmp" && mv "$d/i.tmp" "$d/i"
  sleep "$2"
done
echo "$i"
"""

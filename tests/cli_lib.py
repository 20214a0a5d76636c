"""Helpers for tests that run real ``pipefarm`` processes and check the CLI's contracts."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

PF = [sys.executable, "-m", "pipefarm"]


def pf_cli(*args: str | os.PathLike[str], cwd: Path, preexec: Callable[[], None] | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """One ``pipefarm`` process; stdout and stderr as text."""
    return subprocess.run([*PF, *map(str, args)], cwd=cwd, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, errors="replace", timeout=timeout,
                          preexec_fn=preexec)


def ok(*args: str | os.PathLike[str], cwd: Path) -> str:
    """Run ``pipefarm`` and insist it succeeded; its stdout."""
    p = pf_cli(*args, cwd=cwd)
    assert p.returncode == 0, (args, p.returncode, p.stderr)
    return p.stdout


def one_line_usage_error(p: subprocess.CompletedProcess[str]) -> str:
    """Assert the CLI's contract for a user mistake (one line, exit 2); return the message."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert p.stderr.startswith("pipefarm: error: "), p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.endswith("\n"), p.stderr
    assert "Traceback" not in p.stderr
    return p.stderr

"""Shared test helpers.

``PIPEFARM_REQUIRE_SERVICES=1`` (set by .ci/run) turns "skip: service absent" into a failure, so
CI can never go green by skipping a test that needs SLURM, Grid Engine or a root-only feature.
"""

from __future__ import annotations

import os
import sys

import pytest

REQUIRE_SERVICES = os.environ.get("PIPEFARM_REQUIRE_SERVICES") == "1"


def service_absent(reason: str) -> None:
    """Skip for a missing real service, or fail when ``PIPEFARM_REQUIRE_SERVICES=1``."""
    if REQUIRE_SERVICES:
        pytest.fail(f"required service absent (PIPEFARM_REQUIRE_SERVICES=1): {reason}")
    pytest.skip(reason)


# Make ``tests/`` importable here and in every worker process (forked, or started fresh with
# ``python -m pipefarm.worker``, which inherits PYTHONPATH), so tasks_lib functions resolve.
_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
_pp = os.environ.get("PYTHONPATH", "")
if _TESTS not in _pp.split(os.pathsep):
    os.environ["PYTHONPATH"] = _TESTS + (os.pathsep + _pp if _pp else "")

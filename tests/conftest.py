"""Shared test helpers.

``PIPEFARM_REQUIRE_SERVICES=1`` (set by .ci/run) turns "skip: service absent" into a failure, so
CI can never go green by skipping a test that needs SLURM, Grid Engine or a root-only feature.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

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


# --- the suite's parts ---------------------------------------------------------------------------
# Each folder under tests/ is one kind of test and carries its marker, so `pytest -m unit`,
# `pytest -m "not cluster"` or `pytest tests/faults` select by kind:
#   unit/      one module's behaviour, real files and processes, seconds in all
#   contract/  the store contract (hypothesis state machines) on every store
#   faults/    the failure contract: kills, corruption, starvation, clock skew, for real
#   cluster/   multi-host runs through a real batch scheduler (SLURM, Grid Engine)
# `make test-fast` runs unit/ and contract/ with PIPEFARM_FAST=1 (fewer hypothesis examples).
KINDS = ("unit", "contract", "faults", "cluster")
_TESTS_PATH = Path(_TESTS)

#: examples per hypothesis test under PIPEFARM_FAST=1: enough to catch a broken rule
#: (the full suite's 100 find the rare interleavings)
FAST = os.environ.get("PIPEFARM_FAST") == "1"
FAST_EXAMPLES = 10

if FAST:
    from hypothesis import settings

    settings.register_profile("fast", max_examples=FAST_EXAMPLES, deadline=None)
    settings.load_profile("fast")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test with the kind its folder names."""
    for item in items:
        path = item.path.resolve()
        parts = path.relative_to(_TESTS_PATH).parts if path.is_relative_to(_TESTS_PATH) else ()
        if parts and parts[0] in KINDS:
            item.add_marker(getattr(pytest.mark, parts[0]))

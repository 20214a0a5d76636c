"""``states.py`` owns every state number: no other module writes one as a literal.

A state or outcome compared with, assigned or listed as a bare number in SQL or Python (``state=5``,
``t.state IN (4,5,6,7)``, ``f.outcome == 0``) would silently go wrong the day the numbering
changes; every such place must name the state (``State.FAILED``, ``states.sql_list(...)``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pipefarm

SRC = Path(pipefarm.__file__).parent

# a column or attribute named state/outcome (optionally qualified: t.state, f.outcome, st) next to
# a comparison or assignment and a bare number, or IN followed by a parenthesised number list
_LITERAL = re.compile(
    r"\b(?:[a-z_]+\.)?(?:state|outcome|st)\s*(?:==|!=|<>|<=|>=|=|<|>)\s*\d"
    r"|\b(?:[a-z_]+\.)?(?:state|outcome|st)\s+(?:NOT\s+)?IN\s*\(\s*\d",
    re.IGNORECASE,
)


def _offenders() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "states.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if _LITERAL.search(line):
                found.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    return found


def test_no_state_number_outside_states_py():
    assert _offenders() == []


def test_the_check_finds_what_it_looks_for(tmp_path):
    samples = ["WHERE t.state IN (4,5,6,7)", "AND state=2", "if f.outcome == 0:", "st != 3",
               "outcome NOT IN (1, 2)"]
    assert all(_LITERAL.search(s) for s in samples)
    harmless = ["state={int(State.CLAIMED)}", "f.outcome == Outcome.SUCCEEDED", "states = 3 + x",
                "self.last = 0.0", "state IN {_TERMINAL}"]
    assert not any(_LITERAL.search(s) for s in harmless)

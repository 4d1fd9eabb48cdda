"""The README's table of aggregators says which are exact: hold every "yes" to it.

A "yes" in the "exact?" column is read as: the round applies exactly the ideal update
T = sum_k p_k s_k B_k A_k, for mixed ranks too, and after a round that left components
the next participants do not hold. A method that is exact only in a special case
(Fed-SB: equal ranks) must say so instead of "yes".
"""

from __future__ import annotations

from pathlib import Path

import pytest

import aggregation
from aggregation.diagnostics import relative_error
from tests.aggregation.harness import b_only_updates, random_updates, sb_updates, spec

README = Path(__file__).resolve().parents[2] / "README.md"
MAX_RANK = 6  # Fed-SB needs max_rank <= the smallest module dimension (6)
UPLOADS = {frozenset({"A", "B"}): random_updates, frozenset({"B"}): b_only_updates, frozenset({"R"}): sb_updates}


def exactness_column() -> dict[str, str]:
    """aggregator name -> its "exact?" cell, from the table in "## Aggregators"."""
    section = README.read_text(encoding="utf-8").split("## Aggregators", 1)[1].split("\n## ", 1)[0]
    cells = {}
    for line in section.splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if len(parts) == 4 and parts[0].startswith("`"):
            cells[parts[0].strip("`")] = parts[3]
    return cells


def test_every_registered_aggregator_has_a_row():
    assert sorted(exactness_column()) == sorted(aggregation.names())


CLAIMED_EXACT = sorted(name for name, cell in exactness_column().items() if cell.startswith("yes"))


@pytest.mark.parametrize("name", CLAIMED_EXACT)
@pytest.mark.parametrize("ranks", [[2, 4, 6], [1, 3, 3]], ids=["mixed", "mixed-below-max"])
def test_a_yes_in_the_exact_column_holds_for_mixed_ranks(name, ranks):
    agg = aggregation.create(name)
    make = UPLOADS[agg.uplink]
    # one full-rank round first, so the global adapter has every component in use
    state = agg.aggregate(agg.init_state(spec(MAX_RANK)), make(1, [MAX_RANK, MAX_RANK])).state
    updates = make(2, ranks)
    assert relative_error(agg, state, agg.aggregate(state, updates), updates) < 1e-9

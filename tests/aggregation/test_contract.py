"""What every registered aggregator promises, whatever its math.

One test per promise, run over the whole registry, so a new method is held to them
without copying the tests: it never mutates its inputs (the strategy keeps the state
for checkpoints and resends the same updates on retries), its state serialises without
pickle, and an empty round is an error rather than a silent no-op.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aggregation
from aggregation import ClientInfo
from aggregation.base import WeightedSum
from tests.aggregation.harness import (
    UPLOADS,
    assert_same_tree,
    assert_serialisable,
    snapshot,
    spec,
)

MAX_RANK = 6  # Fed-SB needs max_rank <= the smallest module dimension (6)
METHODS = [(name, {}) for name in aggregation.names()] + [("lora-fair", {"solver": "paper"})]
IDS = [name + "".join(f"-{v}" for v in options.values()) for name, options in METHODS]


def test_every_uplink_has_an_update_maker():
    for name in aggregation.names():
        assert aggregation.create(name).uplink in UPLOADS, name


@pytest.mark.parametrize("name", aggregation.names())
def test_capabilities_are_declared_on_the_class(name):
    # central DP and the calibration check read these, never a table of names elsewhere
    cls = aggregation.get_class(name)
    assert isinstance(cls.weighted_sum, WeightedSum) or (isinstance(cls.weighted_sum, str) and cls.weighted_sum)
    assert isinstance(cls.accepts_calibration, bool)
    if isinstance(cls.weighted_sum, WeightedSum):  # the coverage names only factors it uploads
        assert set(cls.weighted_sum.coverage) <= cls.uplink


def test_a_malformed_weighted_sum_is_refused_naming_it():
    with pytest.raises(ValueError, match="'diagonal'"):
        WeightedSum(coverage={"A": "diagonal"}, renormalised=False)


@pytest.mark.parametrize(("name", "options"), METHODS, ids=IDS)
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), ranks=st.lists(st.sampled_from([1, 2, 4, 6]), min_size=1, max_size=4))
def test_inputs_are_never_mutated_and_state_serialises(name, options, seed, ranks):
    agg = aggregation.create(name, **options)
    state = agg.init_state(spec(MAX_RANK))
    updates = UPLOADS[agg.uplink](seed, ranks)
    before_updates, before_state = snapshot(updates), snapshot(state)

    result = agg.aggregate(state, updates)
    down = agg.downlink(result.state, ClientInfo("x", min(ranks), 4.0))
    agg.global_delta(result.state)
    agg.client_delta(state, updates[0])

    assert_same_tree(updates, before_updates)
    assert_same_tree(state, before_state)
    assert_serialisable(result.state)
    # what is handed out is a copy: scribbling on a downlink must not reach the state
    after = snapshot(result.state)
    for part in (down.adapter, down.frozen):
        for factors in part.values():
            for array in factors.values():
                if isinstance(array, np.ndarray) and array.flags.writeable:
                    array += 1.0
    assert_same_tree(result.state, after)


@pytest.mark.parametrize(("name", "options"), METHODS, ids=IDS)
def test_a_round_without_updates_is_an_error(name, options):
    agg = aggregation.create(name, **options)
    with pytest.raises(ValueError, match="empty"):
        agg.aggregate(agg.init_state(spec(MAX_RANK)), [])


@pytest.mark.parametrize(("name", "options"), METHODS, ids=IDS)
def test_a_round_asks_only_for_factors_the_class_declares_and_the_client_trains(name, options):
    # the strategy sends Downlink.uplink (RoLoRA: one factor a round) and validates replies by it
    agg = aggregation.create(name, **options)
    state = agg.init_state(spec(MAX_RANK))
    for _ in range(2):  # a method may alternate: look at two rounds
        down = agg.downlink(state, ClientInfo("x", 4, 8.0))
        asked = down.uploads(agg.uplink)
        assert asked and asked <= agg.uplink and asked <= down.trainable, (name, asked)
        state = agg.aggregate(state, UPLOADS[agg.uplink](1, [4, MAX_RANK])).state


def test_a_downlink_refuses_unknown_or_empty_uplinks():
    with pytest.raises(ValueError, match="'Q'"):
        aggregation.Downlink(adapter={}, trainable=frozenset({"B"}), uplink=frozenset({"Q"}))
    with pytest.raises(ValueError, match="at least one factor"):
        aggregation.Downlink(adapter={}, trainable=frozenset({"B"}), uplink=frozenset())

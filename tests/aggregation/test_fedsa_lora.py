"""FedSA-LoRA on the server: only A is shared and averaged; B is never asked for nor accepted."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation import ClientInfo, create
from aggregation.diagnostics import relative_error
from tests.aggregation.harness import MODULES, a_only_updates, random_updates, spec, weights

MAX_RANK = 6


def test_the_downlink_sends_a_only_and_keeps_b_on_the_node():
    agg = create("fedsa-lora")
    down = agg.downlink(agg.init_state(spec(MAX_RANK)), ClientInfo("n", 4, 8.0))
    assert down.trainable == frozenset({"A", "B"})
    assert down.uploads(agg.uplink) == frozenset({"A"})
    assert down.personal(agg.uplink) == frozenset({"B"})  # trained, never uploaded
    assert not down.frozen
    for name, shape in MODULES.items():
        assert set(down.adapter[name]) == {"A"} and down.adapter[name]["A"].shape == (4, shape.d_in)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), ranks=st.lists(st.integers(1, MAX_RANK), min_size=1, max_size=4))
def test_each_row_of_a_is_the_mean_over_the_clients_that_hold_it(seed, ranks):
    agg = create("fedsa-lora")
    state = agg.init_state(spec(MAX_RANK, seed=seed))
    updates = a_only_updates(seed, ranks)
    new = agg.aggregate(state, updates).state
    p = weights(updates)
    for name in MODULES:
        for j in range(MAX_RANK):
            holders = [(w, u) for w, u in zip(p, updates) if u.rank > j]
            want = (sum(w * u.tensors[name]["A"][j] for w, u in holders) / sum(w for w, _ in holders)
                    if holders else state.factors[name]["A"][j])
            np.testing.assert_allclose(new.factors[name]["A"][j], want, atol=1e-12)
    if set(ranks) == {MAX_RANK}:  # equal ranks: the plain weighted mean
        for name in MODULES:
            np.testing.assert_allclose(new.factors[name]["A"],
                                       sum(w * u.tensors[name]["A"] for w, u in zip(p, updates)), atol=1e-12)


def test_an_upload_that_carries_b_is_refused():
    agg = create("fedsa-lora")
    with pytest.raises(ValueError, match=r"nodes \['n0'\] uploaded B: fedsa-lora keeps B on the node"):
        agg.aggregate(agg.init_state(spec(MAX_RANK)), random_updates(0, [2]))


def test_the_server_has_no_global_adapter_and_no_relative_error():
    agg = create("fedsa-lora")
    state = agg.init_state(spec(MAX_RANK))
    updates = a_only_updates(1, [2, 4])
    result = agg.aggregate(state, updates)
    for name, shape in MODULES.items():
        delta = agg.global_delta(result.state)[name]
        assert delta["B"].shape == (shape.d_out, 0) and delta["A"].shape == (0, shape.d_in)  # rank 0: the base
    # the clients' B are on their nodes: their adapters, and the round's error, are unknown
    assert math.isnan(relative_error(agg, state, result, updates))

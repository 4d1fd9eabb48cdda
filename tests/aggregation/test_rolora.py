"""RoLoRA: B-rounds and A-rounds in turn; each round's mean is exact when ranks are equal."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation import ClientInfo, create
from aggregation.diagnostics import relative_error
from aggregation.linalg import dense
from tests.aggregation.harness import MODULES, a_only_updates, b_only_updates, spec, weights

MAX_RANK = 6


def trained_state(agg, seed: int = 0):
    """Two rounds in (one B-round, one A-round): B and A both nonzero, the phase back at B."""
    state = agg.init_state(spec(MAX_RANK, seed=seed))
    state = agg.aggregate(state, b_only_updates(seed, [MAX_RANK, MAX_RANK])).state
    return agg.aggregate(state, a_only_updates(seed + 1, [MAX_RANK, MAX_RANK])).state


def phase_ideal(state, updates, module):
    """T = sum_k p_k s_k B_k A_k, each client's adapter made of its upload and the shared factor."""
    f = state.factors[module]
    total = 0.0
    for p, u in zip(weights(updates), updates):
        up = u.tensors[module]
        b = u.scale * up["B"] if "B" in up else f["B"][:, : u.rank]  # the shared B is folded already
        a = up["A"] if "A" in up else f["A"][: u.rank]
        total = total + p * b @ a
    return total


def test_the_phase_alternates_and_starts_with_b():
    agg = create("rolora")
    state = agg.init_state(spec(MAX_RANK))
    seen = []
    for maker in (b_only_updates, a_only_updates, b_only_updates):
        down = agg.downlink(state, ClientInfo("n", 4, 8.0))
        assert down.trainable == down.uplink and len(down.uplink) == 1
        assert down.personal(agg.uplink) == frozenset()  # nothing stays on the node
        seen.append(next(iter(down.uplink)))
        state = agg.aggregate(state, maker(len(seen), [4, MAX_RANK])).state
    # B first: with PEFT's B = 0 an A-round would have zero gradient
    assert seen == ["B", "A", "B"]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), rank=st.sampled_from([1, 3, MAX_RANK]), clients=st.integers(1, 4))
def test_each_round_is_exactly_the_mean_of_the_products_with_equal_ranks(seed, rank, clients):
    agg = create("rolora")
    state = trained_state(agg, seed)
    for maker in (b_only_updates, a_only_updates):  # a B-round, then an A-round
        updates = maker(seed + 7, [rank] * clients)  # unequal alphas and example counts
        result = agg.aggregate(state, updates)
        for name in MODULES:
            applied = dense(agg.global_delta(result.state)[name])
            f = state.factors[name]
            kept = f["B"][:, rank:] @ f["A"][rank:]  # components above the round's rank: in no client's adapter
            np.testing.assert_allclose(applied - kept, phase_ideal(state, updates, name), atol=1e-9)
        if rank == MAX_RANK:
            assert relative_error(agg, state, result, updates) < 1e-9
        state = result.state


def test_the_shared_factor_is_untouched_by_its_round():
    agg = create("rolora")
    state = trained_state(agg)
    after_b = agg.aggregate(state, b_only_updates(3, [2, MAX_RANK])).state
    after_a = agg.aggregate(after_b, a_only_updates(4, [2, MAX_RANK])).state
    for name in MODULES:
        np.testing.assert_array_equal(after_b.factors[name]["A"], state.factors[name]["A"])
        np.testing.assert_array_equal(after_a.factors[name]["B"], after_b.factors[name]["B"])


@pytest.mark.parametrize("maker, factor", [(b_only_updates, "B"), (a_only_updates, "A")])
def test_mixed_ranks_average_each_component_over_its_holders_and_keep_the_rest(maker, factor):
    agg = create("rolora")
    state = trained_state(agg)
    if factor == "A":
        state = agg.aggregate(state, b_only_updates(9, [MAX_RANK])).state  # to an A-round
    updates = maker(5, [2, 4])  # components 4..5: no holder this round
    new = agg.aggregate(state, updates).state
    p = weights(updates)
    for name in MODULES:
        got, before = new.factors[name][factor], state.factors[name][factor]
        for j in range(MAX_RANK):
            holders = [(w, u) for w, u in zip(p, updates) if u.rank > j]
            if not holders:  # kept, never zeroed: a zero B column and A row would never train again
                want = before[:, j] if factor == "B" else before[j]
            else:
                mass = sum(w for w, _ in holders)
                pick = (lambda u: u.scale * u.tensors[name]["B"][:, j]) if factor == "B" else (
                    lambda u: u.tensors[name]["A"][j])
                want = sum(w * pick(u) for w, u in holders) / mass
            np.testing.assert_allclose(got[:, j] if factor == "B" else got[j], want, atol=1e-12)


def test_a_low_rank_client_gets_the_leading_components_of_both_factors():
    agg = create("rolora")
    state = trained_state(agg)
    down = agg.downlink(state, ClientInfo("n", 2, alpha=8.0))  # s = 4
    for name in MODULES:
        np.testing.assert_allclose(down.adapter[name]["A"], state.factors[name]["A"][:2])
        np.testing.assert_allclose(down.adapter[name]["B"], state.factors[name]["B"][:, :2] / 4.0)


def test_an_upload_without_the_rounds_factor_is_refused_naming_the_node():
    agg = create("rolora")
    state = agg.init_state(spec(MAX_RANK))  # a B-round
    with pytest.raises(ValueError, match=r"trains B.*\['n0'\]"):
        agg.aggregate(state, a_only_updates(0, [2]))

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation import ClientInfo, create
from aggregation.diagnostics import relative_error
from aggregation.linalg import dense
from tests.aggregation.harness import (
    MODULES,
    applied,
    assert_same_tree,
    ideal,
    random_updates,
    rescaled,
    spec,
    weights,
    with_alpha,
)

ranks_st = st.lists(st.integers(1, 12), min_size=1, max_size=6)


def _aggregate(updates):
    agg = create("flora")
    state = agg.init_state(spec())
    return agg, state, agg.aggregate(state, updates)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), ranks=ranks_st)
def test_stack_multiplies_out_to_the_ideal_update(seed, ranks):
    """Any ranks (above max_rank too), alphas and example counts: B_stack A_stack = T."""
    updates = random_updates(seed, ranks)
    agg, state, result = _aggregate(updates)
    for name, shape in MODULES.items():
        stack = result.base_update[name]
        assert stack["B"].shape == (shape.d_out, sum(ranks))
        assert stack["A"].shape == (sum(ranks), shape.d_in)
        np.testing.assert_allclose(dense(stack), ideal(updates, name), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(applied(agg, result, name), ideal(updates, name), atol=1e-12)
    assert relative_error(agg, state, result, updates) < 1e-12


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(3, 6), keep=st.integers(1, 2))
def test_partial_participation_weights_only_the_clients_that_replied(seed, n, keep):
    updates = random_updates(seed, [4] * n)
    replied = updates[:keep]
    _, _, result = _aggregate(replied)
    for name in MODULES:
        # ideal() renormalises p_k over the list it is given: the repliers only
        np.testing.assert_allclose(dense(result.base_update[name]), ideal(replied, name))


def test_global_adapter_is_zero_rank_for_every_module_after_a_merge():
    updates = random_updates(1, [3, 5])
    agg, state, result = _aggregate(updates)
    for s in (state, result.state):
        delta = agg.global_delta(s)
        assert set(delta) == set(MODULES)  # present, so diagnostics visit every module
        for name, shape in MODULES.items():
            assert delta[name]["B"].shape == (shape.d_out, 0)
            assert delta[name]["A"].shape == (0, shape.d_in)
    assert result.state.rounds == state.rounds + 1


@pytest.mark.parametrize("rank,alpha", [(1, 1.0), (4, 32.0), (64, 16.0)])
def test_downlink_is_a_fresh_adapter(rank, alpha):
    agg, _, result = _aggregate(random_updates(2, [2, 6]))
    down = agg.downlink(result.state, ClientInfo(node_id="z", rank=rank, alpha=alpha))
    assert down.adapter == {}
    assert down.frozen == {}
    assert down.trainable == frozenset({"A", "B"})


def test_stacking_without_folding_is_wrong_when_scales_differ():
    """The official code's stack: p_k on A, raw B, one adapter-wide scale for all.

    It matches T only when every client's alpha/r equals that one scale; with mixed
    scales it does not, while folding p_k s_k per block does.
    """
    equal = [with_alpha(u, 2.0 * u.rank) for u in random_updates(4, [2, 4, 8])]
    mixed = [with_alpha(u, a) for u, a in zip(equal, [2.0, 32.0, 8.0])]
    for updates, should_match in ((equal, True), (mixed, False)):
        p = weights(updates)
        common_scale = 2.0  # what the official code's server adapter applies
        _, _, result = _aggregate(updates)
        for name in MODULES:
            unfolded = common_scale * np.concatenate(
                [u.tensors[name]["B"] for u in updates], axis=1
            ) @ np.concatenate([pk * u.tensors[name]["A"] for pk, u in zip(p, updates)])
            target = ideal(updates, name)
            assert np.allclose(unfolded, target) is should_match
            np.testing.assert_allclose(dense(result.base_update[name]), target, atol=1e-12)
        # and simply concatenating the raw factors is not T either
        raw_b = np.concatenate([u.tensors["layer0.q"]["B"] for u in updates], axis=1)
        raw = raw_b @ np.concatenate([u.tensors["layer0.q"]["A"] for u in updates])
        assert not np.allclose(raw, ideal(updates, "layer0.q"))


def test_unequal_scales_are_folded_per_client():
    """(alpha, B) -> (c alpha, B / c) is the same adapter: the merge must not change."""
    updates = random_updates(5, [2, 3, 7])
    _, _, before = _aggregate(updates)
    _, _, after = _aggregate([updates[0], rescaled(updates[1], 8.0), rescaled(updates[2], 0.25)])
    for name in MODULES:
        np.testing.assert_allclose(dense(after.base_update[name]), dense(before.base_update[name]))


def test_reply_order_does_not_change_the_logged_stack():
    updates = random_updates(6, [2, 5, 3])
    _, _, forward = _aggregate(updates)
    _, _, backward = _aggregate(updates[::-1])
    assert_same_tree(forward.base_update, backward.base_update)


def test_rank_that_does_not_match_the_arrays_is_refused():
    (u,) = random_updates(7, [4])
    liar = type(u)(**{**u.__dict__, "rank": 2})
    with pytest.raises(ValueError, match="n0"):
        _aggregate([liar])

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation import ClientInfo, create
from aggregation.diagnostics import relative_error
from aggregation.linalg import dense
from tests.aggregation.harness import MODULES, applied, assert_same_tree, ideal, random_updates, rescaled, spec

ranks_st = st.lists(st.integers(1, 8), min_size=1, max_size=6)


def _aggregate(updates, name="fedex-lora", max_rank=8):
    agg = create(name)
    state = agg.init_state(spec(max_rank))
    return agg, state, agg.aggregate(state, updates)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), ranks=ranks_st)
def test_adapter_plus_residual_is_exactly_the_ideal_update(seed, ranks):
    updates = random_updates(seed, ranks)
    agg, state, result = _aggregate(updates)
    for name in MODULES:
        np.testing.assert_allclose(applied(agg, result, name), ideal(updates, name), atol=1e-12)
        assert result.base_update[name]["A"].shape[0] == sum(ranks) + 8
    assert relative_error(agg, state, result, updates) < 1e-12


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), ranks=ranks_st)
def test_adapter_is_fedavg_and_residual_is_what_fedavg_misses(seed, ranks):
    updates = random_updates(seed, ranks)
    fedavg, _, avg = _aggregate(updates, "fedavg")
    agg, _, result = _aggregate(updates)
    for name in MODULES:
        ours, theirs = agg.global_delta(result.state)[name], fedavg.global_delta(avg.state)[name]
        for factor in ("A", "B"):
            np.testing.assert_allclose(ours[factor], theirs[factor], atol=1e-14)
        missed = ideal(updates, name) - dense(fedavg.global_delta(avg.state)[name])
        np.testing.assert_allclose(dense(result.base_update[name]), missed, atol=1e-12)


def test_unequal_scales_are_folded_per_client():
    """(alpha, B) -> (c alpha, B / c) is the same adapter: nothing may change."""
    updates = random_updates(3, [2, 8, 5], alphas=[4.0, 16.0, 1.0])
    agg, _, before = _aggregate(updates)
    _, _, after = _aggregate([rescaled(updates[0], 5.0), updates[1], rescaled(updates[2], 0.1)])
    for name in MODULES:
        np.testing.assert_allclose(
            dense(agg.global_delta(after.state)[name]), dense(agg.global_delta(before.state)[name])
        )
        np.testing.assert_allclose(applied(agg, after, name), ideal(updates, name), atol=1e-12)


def test_downlink_unfolds_the_averaged_factors_for_the_receiving_client():
    agg, _, result = _aggregate(random_updates(4, [4, 8]))
    client = ClientInfo(node_id="z", rank=3, alpha=12.0)
    down = agg.downlink(result.state, client)
    assert down.trainable == frozenset({"A", "B"})
    for name in MODULES:
        g = agg.global_delta(result.state)[name]
        np.testing.assert_allclose(client.scale * down.adapter[name]["B"], g["B"][:, :3])
        np.testing.assert_allclose(down.adapter[name]["A"], g["A"][:3])


def test_reply_order_does_not_change_the_logged_residual():
    updates = random_updates(5, [2, 5, 3])
    _, _, forward = _aggregate(updates)
    _, _, backward = _aggregate(updates[::-1])
    assert_same_tree(forward.base_update, backward.base_update)

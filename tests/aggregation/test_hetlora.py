import dataclasses

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation import ClientInfo, create
from aggregation.hetlora import sparsity_weights
from tests.aggregation.harness import MODULES, assert_serialisable, random_updates, spec, weights


def dense_norm(u, name):
    return np.linalg.norm(u.scale * u.tensors[name]["B"] @ u.tensors[name]["A"])


def zero_update(u):
    return dataclasses.replace(
        u, node_id="zero", num_examples=1000,
        tensors={k: {"A": v["A"], "B": np.zeros_like(v["B"])} for k, v in u.tensors.items()},
    )


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    ranks=st.lists(st.integers(1, 8), min_size=1, max_size=5),
    by_examples=st.booleans(),
)
def test_aggregate_is_the_norm_weighted_mean_over_each_components_holders(seed, ranks, by_examples):
    """Component j (row j of A, column j of s B): sum over r_k > j of w_k x_k / sum of
    those w_k, with HetLoRA's norm weights; the previous value where nobody holds j."""
    agg = create("hetlora", weight_by_examples=by_examples)
    start = agg.init_state(spec(8))
    updates = random_updates(seed, ranks)
    new = agg.aggregate(start, updates).state
    p = weights(updates)
    for name in MODULES:
        raw = np.array([dense_norm(u, name) for u in updates]) * (p if by_examples else 1.0)
        w = raw / raw.sum()
        got = sparsity_weights(updates, name, weight_by_examples=by_examples)
        np.testing.assert_allclose(got, w)
        for j in range(8):
            holders = [(wk, u) for wk, u in zip(w, updates) if u.rank > j]
            g = new.factors[name]
            if not holders:
                np.testing.assert_array_equal(g["A"][j], start.factors[name]["A"][j])
                np.testing.assert_array_equal(g["B"][:, j], start.factors[name]["B"][:, j])
                continue
            mass = sum(wk for wk, _ in holders)
            a = sum(wk * u.tensors[name]["A"][j] for wk, u in holders) / mass
            b = sum(wk * u.scale * u.tensors[name]["B"][:, j] for wk, u in holders) / mass
            np.testing.assert_allclose(g["A"][j], a, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(g["B"][:, j], b, rtol=1e-12, atol=1e-14)


def test_a_client_with_a_zero_update_gets_zero_weight():
    updates = random_updates(1, [2, 8])
    with_zero = [*updates, zero_update(updates[1])]  # large n_k, but nothing learnt
    for by_examples in (False, True):
        agg = create("hetlora", weight_by_examples=by_examples)
        state = agg.init_state(spec(8))
        for name in MODULES:
            assert sparsity_weights(with_zero, name, weight_by_examples=by_examples)[-1] == 0.0
        got = agg.aggregate(state, with_zero).state.factors
        want = agg.aggregate(state, updates).state.factors
        for name in MODULES:
            for f in ("A", "B"):
                np.testing.assert_allclose(got[name][f], want[name][f], rtol=1e-13, atol=1e-15)


def test_equal_norm_clients_get_equal_weight_whatever_their_alpha_and_data():
    """u2 reaches u1's folded update with 4x alpha and B / 4: same norm, same weight.

    A version that ignored s_k would see raw norms differing by 4x and fail.
    """
    (u1,) = random_updates(2, [4], alphas=[4.0])
    u2 = dataclasses.replace(
        u1, node_id="n2", alpha=16.0, num_examples=u1.num_examples * 7,
        tensors={k: {"A": v["A"], "B": -v["B"] / 4.0} for k, v in u1.tensors.items()},
    )
    for name in MODULES:
        np.testing.assert_allclose(sparsity_weights([u1, u2], name), [0.5, 0.5])
        np.testing.assert_allclose(
            sparsity_weights([u1, u2], name, weight_by_examples=True), [1 / 8, 7 / 8]
        )


def test_all_zero_updates_fall_back_to_example_weights():
    updates = [zero_update(u) for u in random_updates(3, [2, 4])]
    updates = [dataclasses.replace(u, num_examples=n) for u, n in zip(updates, (1, 3))]
    for name in MODULES:
        np.testing.assert_allclose(sparsity_weights(updates, name), [0.25, 0.75])


def test_downlink_truncates_per_client_and_unfolds():
    agg = create("hetlora")
    state = agg.aggregate(agg.init_state(spec(8)), random_updates(4, [8, 4])).state
    for rank, alpha in [(1, 2.0), (4, 16.0), (8, 8.0)]:
        client = ClientInfo("z", rank, alpha)
        down = agg.downlink(state, client)
        assert down.trainable == frozenset({"A", "B"})
        for name in MODULES:
            g = state.factors[name]
            np.testing.assert_allclose(client.scale * down.adapter[name]["B"], g["B"][:, :rank])
            np.testing.assert_allclose(down.adapter[name]["A"], g["A"][:rank])
    assert_serialisable(state)

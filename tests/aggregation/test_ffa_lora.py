import dataclasses

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation import ClientInfo, ClientUpdate, create
from aggregation.diagnostics import relative_error
from aggregation.linalg import dense
from tests.aggregation.harness import MODULES, assert_serialisable, b_only_updates, spec, weights


def dense_ideal(state, updates, module):
    """T = sum_k p_k s_k B_k A[:r_k] with the run's frozen A, formed densely."""
    a = state.factors[module]["A"]
    return sum(
        pk * u.scale * u.tensors[module]["B"] @ a[: u.rank]
        for pk, u in zip(weights(updates), updates)
    )


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), ranks=st.lists(st.integers(1, 8), min_size=1, max_size=5))
def test_aggregate_is_exactly_the_ideal_update_with_mixed_ranks_and_alphas(seed, ranks):
    agg = create("ffa-lora")
    state = agg.init_state(spec(8, seed=seed))
    updates = b_only_updates(seed, ranks)  # random, unequal alphas
    result = agg.aggregate(state, updates)
    for name in MODULES:
        np.testing.assert_allclose(
            dense(agg.global_delta(result.state)[name]),
            dense_ideal(state, updates, name),
            atol=1e-10,
        )
    assert relative_error(agg, state, result, updates) < 1e-9


def test_unequal_alphas_are_folded_before_averaging():
    (u1,) = b_only_updates(1, [4], alphas=[4.0])
    u2 = dataclasses.replace(
        u1, node_id="n2", alpha=16.0,
        tensors={k: {"B": v["B"] / 4.0} for k, v in u1.tensors.items()},
    )
    agg = create("ffa-lora")
    state = agg.init_state(spec(4))
    result = agg.aggregate(state, [u1, u2])
    for name in MODULES:
        np.testing.assert_allclose(result.state.factors[name]["B"], 1.0 * u1.tensors[name]["B"])


def test_a_is_frozen_shared_and_peft_initialised():
    agg = create("ffa-lora")
    state = agg.init_state(spec(8, seed=3))
    result = agg.aggregate(state, b_only_updates(2, [2, 8]))
    for name, shape in MODULES.items():
        a = state.factors[name]["A"]
        assert a.shape == (8, shape.d_in)
        assert np.abs(a).max() <= 1.0 / np.sqrt(shape.d_in)  # kaiming-uniform bound
        np.testing.assert_array_equal(state.factors[name]["B"], 0.0)
        np.testing.assert_array_equal(result.state.factors[name]["A"], a)
    assert_serialisable(result.state)


def test_downlink_sends_b_unfolded_and_a_as_frozen_truncated_per_rank():
    agg = create("ffa-lora")
    state = agg.aggregate(agg.init_state(spec(8)), b_only_updates(4, [8, 8])).state
    for rank, alpha in [(2, 6.0), (8, 32.0)]:
        client = ClientInfo("z", rank, alpha)
        down = agg.downlink(state, client)
        assert down.trainable == frozenset({"B"})
        for name, shape in MODULES.items():
            assert set(down.adapter[name]) == {"B"}
            assert set(down.frozen[name]) == {"A"}
            np.testing.assert_array_equal(down.frozen[name]["A"], state.factors[name]["A"][:rank])
            np.testing.assert_allclose(
                client.scale * down.adapter[name]["B"], state.factors[name]["B"][:, :rank]
            )
            assert down.adapter[name]["B"].shape == (shape.d_out, rank)


def test_zero_padding_shrinks_columns_by_the_weight_of_the_clients_that_have_them():
    """Documented consequence of matching T: unchanged clients still shrink high columns."""
    agg = create("ffa-lora")
    state = agg.aggregate(agg.init_state(spec(8)), b_only_updates(5, [8])).state
    clients = [ClientInfo("a", 2, 5.0), ClientInfo("b", 8, 40.0)]
    updates = [
        ClientUpdate(c.node_id, 10 * (i + 1), c.rank, c.alpha, agg.downlink(state, c).adapter)
        for i, c in enumerate(clients)
    ]
    p = weights(updates)
    new = agg.aggregate(state, updates).state
    for name in MODULES:
        old_b, new_b = state.factors[name]["B"], new.factors[name]["B"]
        np.testing.assert_allclose(new_b[:, :2], old_b[:, :2])
        np.testing.assert_allclose(new_b[:, 2:], p[1] * old_b[:, 2:])

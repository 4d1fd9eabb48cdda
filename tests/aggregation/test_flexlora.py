import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation import ClientInfo, create
from aggregation.diagnostics import relative_error
from aggregation.linalg import dense
from aggregation.lowrank import lowrank_svd, truncated_factors
from tests.aggregation.harness import MODULES, assert_serialisable, eckart_young_tail, ideal, random_updates, spec


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    d_out=st.integers(1, 12),
    d_in=st.integers(1, 12),
    q=st.integers(1, 15),
    deficient=st.booleans(),
)
def test_lowrank_svd_is_an_svd_of_the_dense_product(seed, d_out, d_in, q, deficient):
    rng = np.random.default_rng(seed)
    b = rng.normal(size=(d_out, q))
    a = rng.normal(size=(q, d_in))
    if deficient and q > 1:
        b[:, -1] = b[:, 0]  # repeated column: q no longer the rank
        a[-1] = -a[0]
    u, s, vt = lowrank_svd(b, a)
    product = b @ a
    k = min(d_out, d_in, q)
    assert u.shape == (d_out, k) and s.shape == (k,) and vt.shape == (k, d_in)
    np.testing.assert_allclose(s, np.linalg.svd(product, compute_uv=False)[:k], atol=1e-10)
    np.testing.assert_allclose(u.T @ u, np.eye(k), atol=1e-10)
    np.testing.assert_allclose(vt @ vt.T, np.eye(k), atol=1e-10)
    np.testing.assert_allclose((u * s) @ vt, product, atol=1e-10)


def test_truncated_factors_splits_agree_on_the_product():
    rng = np.random.default_rng(0)
    u, s, vt = lowrank_svd(rng.normal(size=(9, 5)), rng.normal(size=(5, 7)))
    by_b = truncated_factors(u, s, vt, 3, split="b")
    by_sqrt = truncated_factors(u, s, vt, 3, split="sqrt")
    np.testing.assert_allclose(dense(by_b), dense(by_sqrt), atol=1e-12)
    np.testing.assert_allclose(by_b["A"] @ by_b["A"].T, np.eye(3), atol=1e-12)
    with pytest.raises(ValueError):
        truncated_factors(u, s, vt, 3, split="nope")


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    ranks=st.lists(st.integers(1, 8), min_size=1, max_size=4),
    split=st.sampled_from(["b", "sqrt"]),
)
def test_each_client_gets_the_eckart_young_truncation_of_the_ideal_update(seed, ranks, split):
    agg = create("flexlora", split=split)
    state = agg.init_state(spec(8))
    updates = random_updates(seed, ranks)  # random, unequal alphas and ranks
    result = agg.aggregate(state, updates)
    for rank in sorted(set(ranks) | {1, 8}):
        client = ClientInfo("c", rank, 7.0)
        down = agg.downlink(result.state, client)
        for name in MODULES:
            t = ideal(updates, name)  # dense reference, includes every s_k
            start = client.scale * down.adapter[name]["B"] @ down.adapter[name]["A"]
            err = np.linalg.norm(t - start)
            assert abs(err - eckart_young_tail(t, rank)) < 1e-9 * max(1.0, np.linalg.norm(t))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 4))
def test_global_error_is_the_tail_beyond_max_rank(seed, n):
    agg = create("flexlora")
    state = agg.init_state(spec(4))
    updates = random_updates(seed, [3] * n)
    result = agg.aggregate(state, updates)
    err_sq = ideal_sq = 0.0
    for name in MODULES:
        t = ideal(updates, name)
        applied = dense(agg.global_delta(result.state)[name])
        assert abs(np.linalg.norm(t - applied) - eckart_young_tail(t, 4)) < 1e-9
        sv = np.linalg.svd(t, compute_uv=False)
        k = min(4, sv.shape[0])
        np.testing.assert_allclose(result.state.singular_values[name][:k], sv[:k], atol=1e-10)
        err_sq += eckart_young_tail(t, 4) ** 2
        ideal_sq += np.linalg.norm(t) ** 2
    assert abs(relative_error(agg, state, result, updates) - np.sqrt(err_sq / ideal_sq)) < 1e-9
    if n == 1:  # a single rank-3 update fits in rank 4: exact
        assert relative_error(agg, state, result, updates) < 1e-9


def test_unequal_alphas_are_folded_before_averaging():
    (u1,) = random_updates(1, [4], alphas=[4.0])
    u2 = dataclasses.replace(
        u1, node_id="n2", alpha=16.0,
        tensors={k: {"A": v["A"], "B": v["B"] / 4.0} for k, v in u1.tensors.items()},
    )
    agg = create("flexlora")
    result = agg.aggregate(agg.init_state(spec(4)), [u1, u2])
    for name in MODULES:
        expected = u1.scale * u1.tensors[name]["B"] @ u1.tensors[name]["A"]
        applied = dense(agg.global_delta(result.state)[name])
        np.testing.assert_allclose(applied, expected, atol=1e-10)


def test_missing_components_are_trainable_zero_b_and_seeded_a():
    agg = create("flexlora")
    state = agg.init_state(spec(8, seed=2))
    (u,) = random_updates(3, [2])
    new = agg.aggregate(state, [u]).state
    for name in MODULES:
        b, a = new.factors[name]["B"], new.factors[name]["A"]
        assert b.shape[1] == 8 and a.shape[0] == 8
        np.testing.assert_array_equal(b[:, 2:], 0.0)
        np.testing.assert_array_equal(a[2:], state.factors[name]["A"][2:])
        np.testing.assert_array_equal(new.singular_values[name][2:], 0.0)
        np.testing.assert_allclose(dense(new.factors[name]), ideal([u], name), atol=1e-10)
    assert_serialisable(new)


def test_downlink_unfolds_for_the_receiving_client():
    agg = create("flexlora")
    state = agg.aggregate(agg.init_state(spec(8)), random_updates(5, [4, 8])).state
    client = ClientInfo("z", 3, 6.0)
    down = agg.downlink(state, client)
    assert down.trainable == frozenset({"A", "B"}) and down.frozen == {}
    for name in MODULES:
        g = agg.global_delta(state)[name]
        np.testing.assert_allclose(client.scale * down.adapter[name]["B"], g["B"][:, :3])
        np.testing.assert_allclose(down.adapter[name]["A"], g["A"][:3])
    with pytest.raises(ValueError):
        agg.downlink(state, ClientInfo("big", 9, 1.0))

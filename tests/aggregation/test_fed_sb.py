import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation import ClientInfo, ClientUpdate, create
from aggregation.diagnostics import relative_error
from aggregation.fed_sb import lora_sb_init
from aggregation.linalg import dense
from aggregation.lowrank import random_orthonormal
from tests.aggregation.harness import (
    MODULES,
    assert_serialisable,
    assert_tensors_equal,
    deep_copy,
    eckart_young_tail,
    sb_updates,
    spec,
    weights,
)

MAX_RANK = 6  # layer0.v is 6 x 10: orthonormal bases need max_rank <= 6


def _frozen(state):
    return {n: (f["B"], f["A"]) for n, f in state.factors.items()}


def dense_ideal(state, updates, module):
    """T = sum_k p_k s_k B_k R_k A_k with the frozen bases, formed densely."""
    b, a = _frozen(state)[module]
    return sum(
        pk * u.scale * b[:, : u.rank] @ u.tensors[module]["R"] @ a[: u.rank]
        for pk, u in zip(weights(updates), updates)
    )


def projector_reference(state, updates, module):
    """The documented hetero rule, computed only from dense matrices and projectors.

    Pi(q)(D) = B_q B_q^T D A_q^T A_q keeps the top-left q x q block of D's coefficients
    (B, A orthonormal). Shell l (between consecutive client ranks) is the weighted mean
    of the clients that reach it; outside every client's block the old adapter stays.
    """
    b, a = _frozen(state)[module]

    def pi(q, d):
        if q == 0:
            return np.zeros_like(d)
        return b[:, :q] @ b[:, :q].T @ d @ a[:q].T @ a[:q]

    p = weights(updates)
    dense_k = [u.scale * b[:, : u.rank] @ u.tensors[module]["R"] @ a[: u.rank] for u in updates]
    old = b @ state.factors[module]["R"] @ a
    shells = sorted({u.rank for u in updates})
    out = old - pi(shells[-1], old)
    inner = 0
    for rho in shells:
        members = [k for k, u in enumerate(updates) if u.rank >= rho]
        mass = sum(p[k] for k in members)
        shell = [p[k] * (pi(rho, dense_k[k]) - pi(inner, dense_k[k])) for k in members]
        out = out + sum(shell) / mass
        inner = rho
    return out


def random_initial(seed: int, rank: int = MAX_RANK):
    """Orthonormal bases and a dense, non-zero R, so untouched entries are visible."""
    rng = np.random.default_rng(seed)
    return {
        name: {
            "B": random_orthonormal(rng, s.d_out, rank),
            "A": random_orthonormal(rng, s.d_in, rank).T,
            "R": rng.normal(size=(rank, rank)),
        }
        for name, s in MODULES.items()
    }


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 5))
def test_equal_ranks_aggregate_is_exactly_the_ideal_update(seed, n):
    agg = create("fed-sb")
    state = agg.init_state(spec(MAX_RANK, seed=seed))
    updates = sb_updates(seed, [MAX_RANK] * n)  # random, unequal alphas
    result = agg.aggregate(state, updates)
    for name in MODULES:
        np.testing.assert_allclose(
            dense(agg.global_delta(result.state)[name]),
            dense_ideal(state, updates, name),
            atol=1e-10,
        )
    assert relative_error(agg, state, result, updates) < 1e-9


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    ranks=st.lists(st.integers(1, MAX_RANK), min_size=1, max_size=5),
)
def test_mixed_ranks_match_the_dense_projector_reference(seed, ranks):
    agg = create("fed-sb", initial=random_initial(seed))
    state = agg.init_state(spec(MAX_RANK, seed=seed))
    updates = sb_updates(seed, ranks)
    result = agg.aggregate(state, updates)
    for name in MODULES:
        np.testing.assert_allclose(
            dense(agg.global_delta(result.state)[name]),
            projector_reference(state, updates, name),
            atol=1e-10,
        )


def test_mixed_ranks_entries_follow_the_documented_rule():
    agg = create("fed-sb", initial=random_initial(1))
    state = agg.init_state(spec(MAX_RANK))
    updates = sb_updates(2, [2, 4, 4])
    p = weights(updates)
    new = agg.aggregate(state, updates).state
    for name in MODULES:
        r_new, r_old = new.factors[name]["R"], state.factors[name]["R"]
        folded = [u.scale * u.tensors[name]["R"] for u in updates]
        # inner 2x2 block: all three clients
        np.testing.assert_allclose(r_new[:2, :2], sum(pk * f[:2, :2] for pk, f in zip(p, folded)))
        # shell 2..3: only the rank-4 clients, weights renormalised
        w = p[1:] / p[1:].sum()
        np.testing.assert_allclose(r_new[2:4, :4], w[0] * folded[1][2:4] + w[1] * folded[2][2:4])
        np.testing.assert_allclose(
            r_new[:2, 2:4], w[0] * folded[1][:2, 2:] + w[1] * folded[2][:2, 2:]
        )
        # nobody trained rows/columns 4..5: unchanged
        np.testing.assert_array_equal(r_new[4:, :], r_old[4:, :])
        np.testing.assert_array_equal(r_new[:, 4:], r_old[:, 4:])


def test_unequal_alphas_are_folded_before_averaging():
    """Two clients reach the same s * R with different alphas: the mean is that s * R."""
    (u1,) = sb_updates(3, [4], alphas=[4.0])
    u2 = dataclasses.replace(
        u1, node_id="n2", alpha=16.0,
        tensors={k: {"R": v["R"] / 4.0} for k, v in u1.tensors.items()},
    )
    agg = create("fed-sb")
    state = agg.init_state(spec(4))
    result = agg.aggregate(state, [u1, u2])
    for name in MODULES:
        np.testing.assert_allclose(result.state.factors[name]["R"], 1.0 * u1.tensors[name]["R"])
        np.testing.assert_allclose(
            dense(agg.global_delta(result.state)[name]), dense_ideal(state, [u1, u2], name)
        )


def test_downlink_is_r_only_with_frozen_bases_truncated_per_rank():
    agg = create("fed-sb", initial=random_initial(4))
    state = agg.init_state(spec(MAX_RANK))
    for rank, alpha in [(2, 8.0), (MAX_RANK, 3.0)]:
        client = ClientInfo(node_id="c", rank=rank, alpha=alpha)
        down = agg.downlink(state, client)
        assert down.trainable == frozenset({"R"})
        for name, shape in MODULES.items():
            assert set(down.adapter[name]) == {"R"}
            assert set(down.frozen[name]) == {"A", "B"}
            b, a = _frozen(state)[name]
            np.testing.assert_array_equal(down.frozen[name]["B"], b[:, :rank])
            np.testing.assert_array_equal(down.frozen[name]["A"], a[:rank])
            assert down.adapter[name]["R"].shape == (rank, rank)
            assert down.frozen[name]["B"].shape == (shape.d_out, rank)
            # the client's own adapter s * B_r R A_r is the global top-left block
            np.testing.assert_allclose(
                client.scale * down.adapter[name]["R"], state.factors[name]["R"][:rank, :rank]
            )


def test_clients_returning_their_downlink_leave_the_state_unchanged():
    agg = create("fed-sb", initial=random_initial(5))
    state = agg.init_state(spec(MAX_RANK))
    clients = [ClientInfo("a", 2, 5.0), ClientInfo("b", 4, 64.0), ClientInfo("c", 6, 1.0)]
    updates = [
        ClientUpdate(
            node_id=c.node_id, num_examples=10 + i, rank=c.rank, alpha=c.alpha,
            tensors=agg.downlink(state, c).adapter,
        )
        for i, c in enumerate(clients)
    ]
    new = agg.aggregate(state, updates).state
    for name in MODULES:
        np.testing.assert_allclose(new.factors[name]["R"], state.factors[name]["R"], atol=1e-12)


def test_random_init_is_orthonormal_seeded_and_zero():
    agg = create("fed-sb")
    state = agg.init_state(spec(MAX_RANK, seed=7))
    again = agg.init_state(spec(MAX_RANK, seed=7))
    other = agg.init_state(spec(MAX_RANK, seed=8))
    for name in MODULES:
        b, a, r = (state.factors[name][k] for k in ("B", "A", "R"))
        np.testing.assert_allclose(b.T @ b, np.eye(MAX_RANK), atol=1e-12)
        np.testing.assert_allclose(a @ a.T, np.eye(MAX_RANK), atol=1e-12)
        np.testing.assert_array_equal(r, 0.0)
        np.testing.assert_array_equal(b, again.factors[name]["B"])
        assert not np.allclose(b, other.factors[name]["B"])
    assert not np.allclose(state.factors["layer0.q"]["A"], state.factors["layer0.v"]["A"])
    assert_serialisable(state)


def test_random_init_refuses_a_rank_above_the_module_dimensions():
    with pytest.raises(ValueError, match="layer0.v"):
        create("fed-sb").init_state(spec(8))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    d_out=st.integers(1, 12),
    d_in=st.integers(1, 12),
    data=st.data(),
)
def test_lora_sb_init_is_the_best_rank_r_approximation(seed, d_out, d_in, data):
    rank = data.draw(st.integers(1, min(d_out, d_in)))
    rng = np.random.default_rng(seed)
    dw = -0.01 * np.sign(rng.normal(size=(d_out, d_in)))  # the -lr * sign(grad) shape
    f = lora_sb_init(dw, rank)
    approx = f["B"] @ f["R"] @ f["A"]
    # Eckart-Young: no rank-r matrix does better, and this one reaches the bound
    assert abs(np.linalg.norm(dw - approx) - eckart_young_tail(dw, rank)) < 1e-10
    np.testing.assert_allclose(f["B"].T @ f["B"], np.eye(rank), atol=1e-10)
    np.testing.assert_allclose(f["A"] @ f["A"].T, np.eye(rank), atol=1e-10)
    np.testing.assert_allclose(f["R"], np.diag(np.diag(f["R"])))
    assert np.all(np.diff(np.diag(f["R"])) <= 1e-12)


def test_lora_sb_initial_gives_each_client_the_best_approximation_at_its_rank():
    rng = np.random.default_rng(9)
    dws = {name: rng.normal(size=(s.d_out, s.d_in)) for name, s in MODULES.items()}
    agg = create("fed-sb", initial={n: lora_sb_init(dw, MAX_RANK) for n, dw in dws.items()})
    state = agg.init_state(spec(MAX_RANK))
    for rank, alpha in [(1, 2.0), (3, 48.0), (MAX_RANK, 6.0)]:
        client = ClientInfo("c", rank, alpha)
        down = agg.downlink(state, client)
        for name, dw in dws.items():
            f = down.frozen[name]
            start = client.scale * f["B"] @ down.adapter[name]["R"] @ f["A"]
            assert abs(np.linalg.norm(dw - start) - eckart_young_tail(dw, rank)) < 1e-10


def test_initial_is_truncated_to_max_rank_and_validated():
    big = random_initial(10, rank=MAX_RANK)
    state = create("fed-sb", initial=big).init_state(spec(3))
    for name in MODULES:
        np.testing.assert_array_equal(state.factors[name]["R"], big[name]["R"][:3, :3])
        np.testing.assert_array_equal(state.factors[name]["B"], big[name]["B"][:, :3])
    with pytest.raises(ValueError, match="rank"):
        create("fed-sb", initial=random_initial(10, rank=2)).init_state(spec(3))
    bad = random_initial(10)
    bad["layer0.q"]["A"] = bad["layer0.q"]["A"][:, :5]
    with pytest.raises(ValueError, match="layer0.q"):
        create("fed-sb", initial=bad).init_state(spec(3))
    missing = random_initial(10)
    del missing["layer0.v"]
    with pytest.raises(ValueError, match="layer0.v"):
        create("fed-sb", initial=missing).init_state(spec(3))


def test_client_delta_is_the_scaled_bra_product():
    agg = create("fed-sb", initial=random_initial(11))
    state = agg.init_state(spec(MAX_RANK))
    (u,) = sb_updates(12, [3])
    delta = agg.client_delta(state, u)
    for name in MODULES:
        b, a = _frozen(state)[name]
        expected = u.scale * b[:, :3] @ u.tensors[name]["R"] @ a[:3]
        np.testing.assert_allclose(dense(delta[name]), expected, atol=1e-12)


def test_the_given_initial_factors_are_not_mutated():
    # the rest of purity is checked for every aggregator in test_contract.py
    initial = random_initial(13)
    initial_copy = deep_copy(initial)
    agg = create("fed-sb", initial=initial)
    result = agg.aggregate(agg.init_state(spec(MAX_RANK)), sb_updates(14, [2, 6]))
    agg.downlink(result.state, ClientInfo("x", 3, 4.0))
    assert_tensors_equal(initial, initial_copy)

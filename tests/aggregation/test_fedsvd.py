"""FedSVD: B averaged in a shared orthonormal basis, the product re-factorised by SVD."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation import ClientInfo, create
from aggregation.base import ModelSpec, ModuleShape
from aggregation.diagnostics import relative_error
from aggregation.fedsvd import orthonormal_factors
from aggregation.linalg import dense
from aggregation.lowrank import random_orthonormal
from privacy.central import CentralDP
from tests.aggregation.harness import MODULES, b_only_updates, eckart_young_tail, spec, weights

MAX_RANK = 8  # above layer0.v's d_out (6): the SVD of its 6 x 8 B has fewer values than components
ranks = st.lists(st.integers(1, MAX_RANK), min_size=1, max_size=4)


def assert_orthonormal_rows(a: np.ndarray) -> None:
    np.testing.assert_allclose(a @ a.T, np.eye(a.shape[0]), atol=1e-10)


def run_rounds(agg, seed: int, rounds: list[list[int]]):
    state = agg.init_state(spec(MAX_RANK, seed=seed))
    for i, r in enumerate(rounds):
        state = agg.aggregate(state, b_only_updates(seed + i, r)).state
    return state


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), history=st.lists(ranks, min_size=0, max_size=3), rank=st.integers(1, MAX_RANK))
def test_a_is_orthonormal_in_every_downlink_and_in_the_global_adapter(seed, history, rank):
    agg = create("fedsvd")
    state = run_rounds(agg, seed, history)
    down = agg.downlink(state, ClientInfo("n", rank, 16.0))
    assert down.trainable == frozenset({"B"}) and down.uploads(agg.uplink) == frozenset({"B"})
    for name in MODULES:
        assert_orthonormal_rows(down.adapter[name]["A"])
        assert_orthonormal_rows(agg.global_delta(state)[name]["A"])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), rank=st.integers(1, MAX_RANK), clients=st.integers(1, 4))
def test_a_round_applies_exactly_the_mean_of_the_products_with_equal_ranks(seed, rank, clients):
    agg = create("fedsvd")
    state = run_rounds(agg, seed, [[MAX_RANK, 3]])
    updates = b_only_updates(seed + 5, [rank] * clients)  # unequal alphas and example counts
    result = agg.aggregate(state, updates)
    sent = agg.global_delta(state)  # the factors every client was sent a truncation of
    for name in MODULES:
        a = sent[name]["A"]
        ideal = sum(p * u.scale * u.tensors[name]["B"] @ a[: u.rank] for p, u in zip(weights(updates), updates))
        kept = sent[name]["B"][:, rank:] @ a[rank:]  # components above the round's rank: kept
        np.testing.assert_allclose(dense(agg.global_delta(result.state)[name]), ideal + kept, atol=1e-9)
    if rank == MAX_RANK:
        assert relative_error(agg, state, result, updates) < 1e-9


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), rank=st.integers(1, MAX_RANK))
def test_a_low_rank_client_starts_from_the_best_rank_r_approximation(seed, rank):
    agg = create("fedsvd")
    state = run_rounds(agg, seed, [[MAX_RANK, MAX_RANK, 5]])
    client = ClientInfo("n", rank, 8.0)
    down = agg.downlink(state, client)
    for name in MODULES:
        full = dense(agg.global_delta(state)[name])
        start = client.scale * down.adapter[name]["B"] @ down.adapter[name]["A"]
        assert np.linalg.norm(full - start) == pytest.approx(eckart_young_tail(full, rank), abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_the_refactorisation_keeps_the_product_and_depends_on_nothing_else(seed):
    rng = np.random.default_rng(seed)
    for d_out in (12, 5):  # more and fewer rows than components
        a = random_orthonormal(rng, 10, 6).T
        b = rng.normal(size=(d_out, 6))
        split = orthonormal_factors(b, a)
        np.testing.assert_allclose(split["B"] @ split["A"], b @ a, atol=1e-10)
        assert_orthonormal_rows(split["A"])
        # the same product written in another basis of the same row space: the same factors,
        # signs included (no dependence on how LAPACK signs its singular vectors)
        q = random_orthonormal(rng, 6, 6)
        other = orthonormal_factors(b @ q, q.T @ a)
        for key in ("A", "B"):
            np.testing.assert_allclose(other[key], split[key], atol=1e-8)


def test_central_dp_noises_the_sum_and_the_basis_is_public():
    inner = create("fedsvd")
    state = run_rounds(inner, 1, [[MAX_RANK, 4]])
    noisy = CentralDP(inner=create("fedsvd"), clip=1.0, noise_multiplier=1.0, seed=0)
    quiet = CentralDP(inner=create("fedsvd"), clip=1.0, noise_multiplier=0.0)
    sent = {}
    updates = []
    for i, rank in enumerate([3, 5]):
        down = inner.downlink(state, ClientInfo(f"n{i}", rank, 8.0))
        sent[f"n{i}"] = down.adapter
        rng = np.random.default_rng(i)
        tensors = {m: {"B": down.adapter[m]["B"] + 0.01 * rng.normal(size=down.adapter[m]["B"].shape)}
                   for m in MODULES}
        updates.append(dataclasses.replace(b_only_updates(0, [rank])[0], node_id=f"n{i}", alpha=8.0,
                                           num_examples=1, tensors=tensors))
    loud, calm = noisy.aggregate(state, updates).state, quiet.aggregate(state, updates).state
    for name in MODULES:
        # the basis is the SVD of the previous (released) state: nothing of this round's sum
        np.testing.assert_array_equal(loud.factors[name]["A"], inner.global_delta(state)[name]["A"])
        noise = loud.factors[name]["B"] - calm.factors[name]["B"]
        assert np.all(noise[:, :5] != 0) and np.all(noise[:, 5:] == 0)  # only columns someone trained
        # what the clients get next is the SVD of the noised sum: post-processing, still orthonormal
        assert_orthonormal_rows(noisy.downlink(loud, ClientInfo("n0", 3, 8.0)).adapter[name]["A"])


def test_max_rank_above_a_modules_input_dimension_is_refused():
    spec_ = ModelSpec(modules={"m": ModuleShape(d_out=8, d_in=4)}, max_rank=6)
    with pytest.raises(ValueError, match="module m has d_in 4 < max-rank 6"):
        create("fedsvd").init_state(spec_)

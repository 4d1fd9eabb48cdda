"""Mixed ranks in the four factor-averaging methods: no component dies in a round.

Component j of a rank-m adapter is row j of A and column j of the folded B. A round in
which no participant has rank above j used to set both to exactly zero (the zero-padded
mean), and a PEFT layer gives both factors of such a component zero gradient, so it
could never train again. The rule now (``linalg.holder_weighted_mean``): average each
component over the participants that hold it, weights renormalised over them, and keep
the previous global value where none does.

The reference below is written per component, independently of the vectorised helper,
so the tests also run against the old code (where they fail).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation import ClientInfo, create
from aggregation.base import ClientUpdate
from aggregation.hetlora import sparsity_weights
from aggregation.linalg import example_weights
from aggregation.lora_fair import closed_form_correction, iter_folded
from tests.aggregation.harness import MODULES, applied, ideal, random_updates, spec

MAX_RANK = 8
METHODS = ["fedavg", "fedex-lora", "hetlora", "lora-fair"]
# ranks of one round, all below MAX_RANK, so components max(ranks)..7 have no holder
low_ranks = st.lists(st.integers(1, MAX_RANK - 1), min_size=1, max_size=4)


def previous_state(agg, seed: int):
    """The method's state with every component alive (A and B dense and nonzero)."""
    rng = np.random.default_rng(seed + 7)
    factors = {
        name: {"A": rng.normal(size=(MAX_RANK, s.d_in)), "B": rng.normal(size=(s.d_out, MAX_RANK))}
        for name, s in MODULES.items()
    }
    return dataclasses.replace(agg.init_state(spec(MAX_RANK)), factors=factors)


def holder_mean_reference(
    previous: dict[str, np.ndarray], updates: list[ClientUpdate], weights: np.ndarray, name: str
) -> dict[str, np.ndarray]:
    """Per component j: mean over clients with r_k > j, weights renormalised; else kept."""
    a, b = previous["A"].copy(), previous["B"].copy()
    for j in range(a.shape[0]):
        holders = [(w, u) for w, u in zip(weights, updates, strict=True) if u.rank > j and w > 0]
        if not holders:
            continue
        mass = sum(w for w, _ in holders)
        a[j] = sum(w * u.tensors[name]["A"][j] for w, u in holders) / mass
        b[:, j] = sum(w * u.scale * u.tensors[name]["B"][:, j] for w, u in holders) / mass
    return {"A": a, "B": b}


def method_weights(method: str, updates: list[ClientUpdate], name: str) -> np.ndarray:
    """The per-client weights each method averages with (p_k, or HetLoRA's norms)."""
    return sparsity_weights(updates, name) if method == "hetlora" else example_weights(updates)


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), ranks=low_ranks)
def test_a_component_no_participant_holds_is_unchanged_by_a_round(method, seed, ranks):
    agg = create(method)
    state = previous_state(agg, seed)
    new = agg.aggregate(state, random_updates(seed, ranks)).state
    top = max(ranks)
    for name in MODULES:
        before, after = state.factors[name], new.factors[name]
        np.testing.assert_array_equal(after["A"][top:], before["A"][top:])
        if method != "lora-fair":  # LoRA-FAIR corrects B on purpose: tested below
            np.testing.assert_array_equal(after["B"][:, top:], before["B"][:, top:])
        # alive: a later high-rank client is sent nonzero factors for these components
        down = agg.downlink(new, ClientInfo("hi", MAX_RANK, 16.0)).adapter[name]
        assert np.all(np.abs(down["A"][top:]).sum(axis=1) > 0)
        assert np.all(np.abs(down["B"][:, top:]).sum(axis=0) > 0)


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), ranks=st.lists(st.integers(1, MAX_RANK), min_size=1, max_size=5))
def test_a_component_some_participants_hold_is_their_renormalised_weighted_mean(method, seed, ranks):
    agg = create(method)
    state = previous_state(agg, seed)
    updates = random_updates(seed, ranks)
    new = agg.aggregate(state, updates).state
    for name in MODULES:
        # FedEx-LoRA hands its factors to FedAvg in node order; the mean does not care
        want = holder_mean_reference(state.factors[name], updates, method_weights(method, updates, name), name)
        np.testing.assert_allclose(new.factors[name]["A"], want["A"], rtol=1e-12, atol=1e-13)
        if method != "lora-fair":
            np.testing.assert_allclose(new.factors[name]["B"], want["B"], rtol=1e-12, atol=1e-13)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), ranks=st.lists(st.integers(1, MAX_RANK), min_size=1, max_size=5))
def test_lora_fair_corrects_the_per_holder_mean(seed, ranks):
    """B = B_bar + dB with B_bar the per-holder mean and dB solved against that mean."""
    agg = create("lora-fair")
    state = previous_state(agg, seed)
    updates = random_updates(seed, ranks)
    new = agg.aggregate(state, updates).state
    weights = example_weights(updates)
    for name in MODULES:
        mean = holder_mean_reference(state.factors[name], updates, weights, name)
        delta = closed_form_correction(iter_folded(updates, weights, name), mean, 0.0)
        got = new.factors[name]["B"]
        np.testing.assert_allclose(got, mean["B"] + delta, atol=1e-9 * np.abs(got).max())


def test_lora_fair_without_correction_keeps_b_of_unheld_components():
    """A regulariser large enough to leave dB = 0 leaves the kept columns of B exact."""
    agg = create("lora-fair", solver="paper", lam=1e6)
    state = previous_state(agg, 5)
    new = agg.aggregate(state, random_updates(5, [2, 3])).state
    for name in MODULES:
        assert new.correction_norm[name] == 0.0
        np.testing.assert_array_equal(new.factors[name]["B"][:, 3:], state.factors[name]["B"][:, 3:])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), ranks=low_ranks)
def test_fedex_residual_cancels_the_kept_components(seed, ranks):
    """The kept components stay in the adapter, and the residual subtracts their product,
    so adapter + this round's base update is still exactly T."""
    agg = create("fedex-lora")
    state = previous_state(agg, seed)
    updates = random_updates(seed, ranks)
    result = agg.aggregate(state, updates)
    top = max(ranks)
    for name in MODULES:
        np.testing.assert_array_equal(result.state.factors[name]["A"][top:], state.factors[name]["A"][top:])
        target = ideal(updates, name)
        np.testing.assert_allclose(applied(agg, result, name), target, atol=1e-10 * np.abs(target).max())


def test_helper_refuses_factors_that_do_not_match_the_reported_rank():
    from aggregation.linalg import holder_weighted_mean  # here: the rest runs on old code

    (update,) = random_updates(0, [3])
    bad = dataclasses.replace(update, rank=4)
    previous = create("fedavg").init_state(spec(MAX_RANK)).factors["layer0.q"]
    with pytest.raises(ValueError, match="rank 4"):
        holder_weighted_mean(previous, [bad], np.array([1.0]), "layer0.q")

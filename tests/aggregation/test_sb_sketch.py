"""The federated LoRA-SB init's linear algebra: sums of sketches, exact recovery, Eckart-Young."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation.base import ModuleShape
from aggregation.sb_sketch import (
    approximated_step,
    init_from_sketches,
    sketch,
    sketch_matrices,
    sketch_sizes,
)


def best_rank(m: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return u[:, :r] * s[:r] @ vt[:r]


def summed_sketch(grads, omega, psi):
    parts = [sketch(g, omega, psi) for g in grads]
    return sum(p["Y"] for p in parts), sum(p["W"] for p in parts)


def test_sizes_are_capped_by_the_module_and_refuse_a_rank_it_cannot_hold():
    assert sketch_sizes(ModuleShape(576, 576), rank=64, oversample=10) == (74, 84)
    assert sketch_sizes(ModuleShape(192, 576), rank=64, oversample=200) == (192, 192)
    with pytest.raises(ValueError, match="rank 40"):
        sketch_sizes(ModuleShape(32, 16), rank=40, oversample=0)


def test_test_matrices_depend_only_on_seed_and_module():
    shape = ModuleShape(12, 20)
    a = sketch_matrices(3, "m", shape, rank=2, oversample=3)
    b = sketch_matrices(3, "m", shape, rank=2, oversample=3)
    c = sketch_matrices(3, "n", shape, rank=2, oversample=3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[0], c[0])
    assert a[0].shape == (20, 5) and a[1].shape == (8, 12)


def test_summed_sketches_are_the_sketch_of_the_summed_gradient():
    shape = ModuleShape(10, 14)
    omega, psi = sketch_matrices(0, "m", shape, rank=3, oversample=2)
    rng = np.random.default_rng(1)
    grads = [rng.normal(size=(10, 14)) for _ in range(3)]
    y, w = summed_sketch(grads, omega, psi)
    whole = sketch(sum(grads), omega, psi)
    np.testing.assert_allclose(y, whole["Y"], atol=1e-12)
    np.testing.assert_allclose(w, whole["W"], atol=1e-12)


def test_a_gradient_within_the_sketch_rank_is_recovered_exactly():
    """rank(G) <= k: the approximated step is exactly the normalised gradient step."""
    shape, lr = ModuleShape(30, 40), 0.01
    rng = np.random.default_rng(2)
    g = rng.normal(size=(30, 5)) @ rng.normal(size=(5, 40))
    omega, psi = sketch_matrices(7, "m", shape, rank=3, oversample=2)  # k = 5
    y, w = summed_sketch([g], omega, psi)
    expected = -lr * np.sqrt(30 * 40) * g / np.linalg.norm(g)
    np.testing.assert_allclose(approximated_step(y, w, psi, shape, lr), expected, atol=1e-10)
    init = init_from_sketches(y, w, psi, shape, rank=3, learning_rate=lr)
    np.testing.assert_allclose(init["B"] @ init["R"] @ init["A"], best_rank(expected, 3), atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), d_out=st.integers(4, 24), d_in=st.integers(4, 24), data=st.data())
def test_b_r_a_is_the_best_rank_r_approximation_of_the_approximated_step(seed, d_out, d_in, data):
    """Eckart-Young, whatever the sketch size: B R A is the best rank-r approximation of dW_fed."""
    rank = data.draw(st.integers(1, min(d_out, d_in)))
    oversample = data.draw(st.integers(0, 6))
    shape, lr = ModuleShape(d_out, d_in), 0.05
    rng = np.random.default_rng(seed)
    grads = [rng.normal(size=(d_out, d_in)) for _ in range(2)]
    omega, psi = sketch_matrices(seed, "m", shape, rank=rank, oversample=oversample)
    y, w = summed_sketch(grads, omega, psi)
    init = init_from_sketches(y, w, psi, shape, rank=rank, learning_rate=lr)
    step = approximated_step(y, w, psi, shape, lr)
    np.testing.assert_allclose(init["B"] @ init["R"] @ init["A"], best_rank(step, rank), atol=1e-9)
    np.testing.assert_allclose(init["B"].T @ init["B"], np.eye(rank), atol=1e-9)
    np.testing.assert_allclose(init["A"] @ init["A"].T, np.eye(rank), atol=1e-9)
    diag = np.diag(init["R"])
    assert np.all(diag >= 0) and np.all(np.diff(diag) <= 1e-12)
    # the step has the sign step's Frobenius norm
    assert np.linalg.norm(step) == pytest.approx(lr * np.sqrt(d_out * d_in), rel=1e-9)


def test_a_zero_gradient_gives_a_zero_update_not_nan():
    shape = ModuleShape(6, 8)
    omega, psi = sketch_matrices(0, "m", shape, rank=2, oversample=1)
    y, w = summed_sketch([np.zeros((6, 8))], omega, psi)
    init = init_from_sketches(y, w, psi, shape, rank=2, learning_rate=0.1)
    assert np.all(init["R"] == 0) and np.isfinite(init["B"]).all() and np.isfinite(init["A"]).all()

"""Extra helpers for the Fed-SB, FFA-LoRA, FlexLoRA and HetLoRA property tests."""

from __future__ import annotations

import dataclasses

import numpy as np

from aggregation.base import ClientUpdate
from tests.aggregation.helpers import MODULES


def example_p(updates: list[ClientUpdate]) -> np.ndarray:
    n = np.array([u.num_examples for u in updates], dtype=float)
    return n / n.sum()


def _updates(seed: int, ranks: list[int], alphas: list[float] | None, factor: str, shape) -> list[ClientUpdate]:
    rng = np.random.default_rng(seed)
    alphas = alphas or [float(rng.uniform(1, 32)) for _ in ranks]
    return [
        ClientUpdate(
            node_id=f"n{i}",
            num_examples=int(rng.integers(1, 100)),
            rank=r,
            alpha=alphas[i],
            tensors={name: {factor: rng.normal(size=shape(s, r))} for name, s in MODULES.items()},
        )
        for i, r in enumerate(ranks)
    ]


def sb_updates(seed: int, ranks: list[int], alphas: list[float] | None = None):
    """Fed-SB uploads: one raw r_k x r_k R per module."""
    return _updates(seed, ranks, alphas, "R", lambda s, r: (r, r))


def b_only_updates(seed: int, ranks: list[int], alphas: list[float] | None = None):
    """FFA-LoRA uploads: one raw d_out x r_k B per module."""
    return _updates(seed, ranks, alphas, "B", lambda s, r: (s.d_out, r))


def eckart_young_tail(matrix: np.ndarray, rank: int) -> float:
    """sqrt(sum_{i > rank} sigma_i^2): the best possible rank-`rank` error."""
    s = np.linalg.svd(matrix, compute_uv=False)
    return float(np.sqrt(np.sum(s[rank:] ** 2)))


def deep_copy(tensors) -> dict:
    return {k: {f: np.array(v, copy=True) for f, v in fs.items()} for k, fs in tensors.items()}


def assert_tensors_equal(actual, expected) -> None:
    assert set(actual) == set(expected)
    for k in expected:
        assert set(actual[k]) == set(expected[k])
        for f in expected[k]:
            np.testing.assert_array_equal(actual[k][f], expected[k][f])


def assert_serialisable(value) -> None:
    """States hold only numpy arrays, numbers, strings and dicts/tuples of those."""
    if dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            assert_serialisable(getattr(value, field.name))
    elif isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str), k
            assert_serialisable(v)
    elif isinstance(value, tuple):
        for v in value:
            assert_serialisable(v)
    else:
        allowed = (np.ndarray, int, float, str, np.floating, np.integer)
        assert isinstance(value, allowed), type(value)

"""Random client updates for property tests: mixed ranks, alphas and example counts."""

from __future__ import annotations

import numpy as np

from aggregation.base import ClientUpdate, ModelSpec, ModuleShape

MODULES = {"layer0.q": ModuleShape(d_out=12, d_in=10), "layer0.v": ModuleShape(d_out=6, d_in=10)}


def spec(max_rank: int = 8, seed: int = 0) -> ModelSpec:
    return ModelSpec(modules=MODULES, max_rank=max_rank, seed=seed)


def lora_update(
    rng: np.random.Generator, node: str, rank: int, alpha: float, n: int, *, a_shared=None
) -> ClientUpdate:
    tensors = {}
    for name, shape in MODULES.items():
        a = rng.normal(size=(rank, shape.d_in)) if a_shared is None else a_shared[name][:rank]
        tensors[name] = {"A": a, "B": rng.normal(size=(shape.d_out, rank))}
    return ClientUpdate(node_id=node, num_examples=n, rank=rank, alpha=alpha, tensors=tensors)


def random_updates(seed: int, ranks: list[int], alphas: list[float] | None = None, a_shared=None):
    rng = np.random.default_rng(seed)
    alphas = alphas or [float(rng.uniform(1, 32)) for _ in ranks]
    return [
        lora_update(rng, f"n{i}", r, alphas[i], int(rng.integers(1, 100)), a_shared=a_shared)
        for i, r in enumerate(ranks)
    ]


def ideal(updates: list[ClientUpdate], module: str) -> np.ndarray:
    """T = sum_k p_k s_k B_k A_k, dense, the reference every exactness test uses."""
    n = np.array([u.num_examples for u in updates], dtype=float)
    p = n / n.sum()
    return sum(
        pk * u.scale * u.tensors[module]["B"] @ u.tensors[module]["A"]
        for pk, u in zip(p, updates)
    )

"""The one harness for the aggregation tests, the way Opacus's grad_samples/common.py serves its own.

* update factories, keyed by what a method uploads (``UPLOADS[aggregator.uplink]``);
* dense references: the ideal update, what a round applied, example weights, SVD bounds;
* tree assertions: no mutation (snapshot / same tree), states that serialise, equal tensors.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

from aggregation.base import Aggregation, ClientUpdate, ModelSpec, ModuleShape
from aggregation.linalg import dense

# --- update factories ---------------------------------------------------------------------

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


def a_only_updates(seed: int, ranks: list[int], alphas: list[float] | None = None):
    """FedSA-LoRA uploads: one raw r_k x d_in A per module (B stays on the node)."""
    return _updates(seed, ranks, alphas, "A", lambda s, r: (r, s.d_in))


#: what a method uploads -> a maker of such updates ``(seed, ranks, alphas=None)``
UPLOADS = {frozenset({"A", "B"}): random_updates, frozenset({"B"}): b_only_updates, frozenset({"R"}): sb_updates,
           frozenset({"A"}): a_only_updates}


# --- dense references ---------------------------------------------------------------------

def ideal(updates: list[ClientUpdate], module: str) -> np.ndarray:
    """T = sum_k p_k s_k B_k A_k, dense, the reference every exactness test uses."""
    n = np.array([u.num_examples for u in updates], dtype=float)
    p = n / n.sum()
    return sum(
        pk * u.scale * u.tensors[module]["B"] @ u.tensors[module]["A"]
        for pk, u in zip(p, updates)
    )


def weights(updates: list[ClientUpdate]) -> np.ndarray:
    n = np.array([u.num_examples for u in updates], dtype=float)
    return n / n.sum()


def applied(agg, result: Aggregation, module: str) -> np.ndarray:
    """What the round changed in the model: global adapter + this round's base update."""
    out = dense(agg.global_delta(result.state)[module])
    if module in result.base_update:
        out = out + dense(result.base_update[module])
    return out


def rescaled(update: ClientUpdate, factor: float) -> ClientUpdate:
    """The same adapter product reached with alpha * factor and B / factor."""
    tensors = {
        name: {"A": f["A"].copy(), "B": f["B"] / factor} for name, f in update.tensors.items()
    }
    return dataclasses.replace(update, alpha=update.alpha * factor, tensors=tensors)


def with_alpha(update: ClientUpdate, alpha: float) -> ClientUpdate:
    """The same raw factors under another alpha (so another s = alpha / rank)."""
    return dataclasses.replace(update, alpha=alpha)


def eckart_young_tail(matrix: np.ndarray, rank: int) -> float:
    """sqrt(sum_{i > rank} sigma_i^2): the best possible rank-`rank` error."""
    s = np.linalg.svd(matrix, compute_uv=False)
    return float(np.sqrt(np.sum(s[rank:] ** 2)))


def row_space_lower_bound(target: np.ndarray, a_bar: np.ndarray) -> float:
    """||T (I - pinv(A) A)||_F / ||T||_F: the floor for any correction of B alone."""
    projector = np.linalg.pinv(a_bar) @ a_bar
    return float(np.linalg.norm(target - target @ projector) / np.linalg.norm(target))


def cosine(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(x * y) / (np.linalg.norm(x) * np.linalg.norm(y)))


# --- tree assertions ----------------------------------------------------------------------

def snapshot(obj):
    return copy.deepcopy(obj)


def assert_same_tree(a, b) -> None:
    """Recursive equality for states and tensors (arrays compared exactly)."""
    if dataclasses.is_dataclass(a):
        assert type(a) is type(b)
        for f in dataclasses.fields(a):
            assert_same_tree(getattr(a, f.name), getattr(b, f.name))
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tree(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


def assert_serialisable(obj, path: str = "state") -> None:
    """States may hold only arrays, numbers, strings and dicts/tuples of those."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            assert_serialisable(getattr(obj, f.name), f"{path}.{f.name}")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, str), f"{path}: key {k!r} is not a string"
            assert_serialisable(v, f"{path}[{k!r}]")
    elif isinstance(obj, tuple):
        for i, v in enumerate(obj):
            assert_serialisable(v, f"{path}[{i}]")
    else:
        assert isinstance(obj, (np.ndarray, int, float, str, np.number)), (
            f"{path} holds a {type(obj).__name__}"
        )


def deep_copy(tensors) -> dict:
    return {k: {f: np.array(v, copy=True) for f, v in fs.items()} for k, fs in tensors.items()}


def assert_tensors_equal(actual, expected) -> None:
    assert set(actual) == set(expected)
    for k in expected:
        assert set(actual[k]) == set(expected[k])
        for f in expected[k]:
            np.testing.assert_array_equal(actual[k][f], expected[k][f])

"""More helpers for aggregator tests: applied updates, rescaled clients, snapshots."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

from aggregation.base import Aggregation, ClientUpdate
from aggregation.linalg import dense


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


def row_space_lower_bound(target: np.ndarray, a_bar: np.ndarray) -> float:
    """||T (I - pinv(A) A)||_F / ||T||_F: the floor for any correction of B alone."""
    projector = np.linalg.pinv(a_bar) @ a_bar
    return float(np.linalg.norm(target - target @ projector) / np.linalg.norm(target))


def cosine(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(x * y) / (np.linalg.norm(x) * np.linalg.norm(y)))

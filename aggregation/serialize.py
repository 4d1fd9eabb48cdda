"""Aggregator states to and from plain data (JSON + named arrays), without pickle.

A state is a frozen dataclass whose fields are numpy arrays, numbers, strings, and
dicts/lists/tuples of those. ``to_tree`` turns it into a JSON-able tree in which each
array is replaced by a reference into a flat ``arrays`` dict; ``from_tree`` rebuilds
it. Only dataclasses defined in this package can be rebuilt, so loading a checkpoint
never imports or runs arbitrary code.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import numpy as np

PACKAGE = "aggregation"


def to_tree(value: Any, arrays: dict[str, np.ndarray], path: str = "state") -> Any:
    if isinstance(value, np.ndarray):
        arrays[path] = value
        return {"__array__": path}
    if isinstance(value, np.generic):
        return value.item()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        if not cls.__module__.startswith(PACKAGE + "."):
            raise TypeError(f"cannot serialise {cls.__module__}.{cls.__qualname__}: not an aggregation state")
        return {
            "__dataclass__": f"{cls.__module__}:{cls.__qualname__}",
            "fields": {f.name: to_tree(getattr(value, f.name), arrays, f"{path}.{f.name}") for f in dataclasses.fields(value)},
        }
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"state dict keys must be strings, got {key!r} at {path}")
        return {"__dict__": {k: to_tree(v, arrays, f"{path}[{k}]") for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return {"__seq__": type(value).__name__, "items": [to_tree(v, arrays, f"{path}[{i}]") for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot serialise {type(value).__name__} at {path}")


def from_tree(tree: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(tree, dict):
        if "__array__" in tree:
            return arrays[tree["__array__"]]
        if "__dataclass__" in tree:
            module_name, _, qualname = tree["__dataclass__"].partition(":")
            if not module_name.startswith(PACKAGE + "."):
                raise ValueError(f"refusing to rebuild {tree['__dataclass__']!r}: not an aggregation state")
            cls = getattr(importlib.import_module(module_name), qualname)
            if not dataclasses.is_dataclass(cls):
                raise ValueError(f"{tree['__dataclass__']!r} is not a dataclass")
            return cls(**{k: from_tree(v, arrays) for k, v in tree["fields"].items()})
        if "__dict__" in tree:
            return {k: from_tree(v, arrays) for k, v in tree["__dict__"].items()}
        if "__seq__" in tree:
            items = [from_tree(v, arrays) for v in tree["items"]]
            return tuple(items) if tree["__seq__"] == "tuple" else items
        raise ValueError(f"unrecognised state node with keys {sorted(tree)}")
    return tree

"""Federated LoRA aggregators: a registry from names to classes.

``register("name")`` refuses duplicates; ``create("name", **kwargs)`` builds one and an
unknown name gets an error that lists every valid name. This package is pure
numpy: it imports nothing from Flower, PEFT, torch models or the database.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from aggregation.base import (
    Aggregation,
    Aggregator,
    ClientInfo,
    ClientUpdate,
    Downlink,
    ModelSpec,
    ModuleShape,
    DEFAULT_RECOMMENDED,
    Recommended,
    Tensors,
    WeightedSum,
)

_REGISTRY: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make an aggregator available under ``name``."""

    def decorator(cls: T) -> T:
        if name in _REGISTRY:
            raise ValueError(
                f"aggregator name {name!r} is already registered to {_REGISTRY[name].__name__}"
            )
        _REGISTRY[name] = cls
        cls.name = name  # type: ignore[attr-defined]
        return cls

    return decorator


def names() -> list[str]:
    """Every registered aggregator name, sorted."""
    return sorted(_REGISTRY)


def get_class(name: str) -> type:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown aggregator {name!r}; valid names are: {', '.join(names())}"
        ) from None


def weighted_sum_names() -> list[str]:
    """The registered methods whose aggregate is a weighted sum (the capability their class declares)."""
    return [name for name in names() if isinstance(_REGISTRY[name].weighted_sum, WeightedSum)]


def recommended(name: str) -> Recommended:
    """The method's recommended local settings (its class's ``recommended``, else the default)."""
    value = getattr(get_class(name), "recommended", DEFAULT_RECOMMENDED)
    if not isinstance(value, Recommended):
        raise TypeError(f"aggregator {name!r}: 'recommended' must be a Recommended, got {type(value).__name__}")
    return value


def create(name: str, **kwargs: Any) -> Aggregator:
    """Build the aggregator registered under ``name`` with keyword options."""
    return get_class(name)(**kwargs)  # type: ignore[no-any-return]


# The built-in methods: importing a module registers its class, one explicit import each.
from aggregation import (  # noqa: E402, F401  (imported for their @register)
    fed_sb,
    fedavg,
    fedex_lora,
    fedsa_lora,
    fedsvd,
    ffa_lora,
    flexlora,
    flora,
    hetlora,
    lora_fair,
    rolora,
)

__all__ = [
    "Aggregation",
    "Aggregator",
    "ClientInfo",
    "ClientUpdate",
    "Downlink",
    "ModelSpec",
    "ModuleShape",
    "Recommended",
    "Tensors",
    "WeightedSum",
    "create",
    "get_class",
    "names",
    "recommended",
    "register",
    "weighted_sum_names",
]

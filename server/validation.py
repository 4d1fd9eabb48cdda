"""Checks on client updates before they reach an aggregator.

Every failure is a reason string that ends up in the database next to the node; the
update is excluded and the round goes on with the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aggregation import Aggregator, ClientUpdate, ModelSpec, Tensors
from aggregation.base import expected_shapes
from core.wire import PayloadError


@dataclass(frozen=True, kw_only=True)
class UpdateLimits:
    max_payload_bytes: int = 0  # 0: no limit
    max_norm_ratio: float = 0.0  # 0: off; else reject norm > ratio * median of the round
    min_for_median: int = 3  # a median of fewer updates says little about outliers

    def __post_init__(self) -> None:
        if self.max_payload_bytes < 0:
            raise ValueError(f"max payload must be >= 0 bytes, got {self.max_payload_bytes}")
        if self.max_norm_ratio < 0:
            raise ValueError(f"max-update-norm-ratio must be >= 0, got {self.max_norm_ratio}")


def check_update(tensors: Tensors, spec: ModelSpec, aggregator: Aggregator, rank: int, *,
                 uplink: frozenset[str] | None = None) -> None:
    """Refuse missing/extra modules or factors, wrong shapes and non-finite values.

    ``uplink``: the factors asked for this round (``Downlink.uplink``); None: the method's own.
    """
    asked = aggregator.uplink if uplink is None else uplink
    missing = sorted(set(spec.modules) - set(tensors))
    extra = sorted(set(tensors) - set(spec.modules))
    if missing or extra:
        raise PayloadError(f"modules missing {missing[:3]} / unexpected {extra[:3]}")
    for name, factors in tensors.items():
        want = expected_shapes(aggregator.adapter_kind, asked, spec.modules[name], rank)
        if set(factors) != set(want):
            raise PayloadError(f"{name}: factors {sorted(factors)}, expected {sorted(want)}")
        for key, shape in want.items():
            value = factors[key]
            if tuple(value.shape) != shape:
                raise PayloadError(f"{name}.{key}: shape {tuple(value.shape)} does not match rank {rank} ({shape})")
            if not np.isfinite(value).all():
                raise PayloadError(f"{name}.{key}: contains NaN or Inf")


def check_size(num_bytes: int, limits: UpdateLimits) -> None:
    if limits.max_payload_bytes and num_bytes > limits.max_payload_bytes:
        raise PayloadError(f"payload of {num_bytes} bytes exceeds the limit of {limits.max_payload_bytes} bytes")


def update_norm(update: ClientUpdate) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(v))) for f in update.tensors.values() for v in f.values())))


def norm_outliers(updates: Sequence[ClientUpdate], limits: UpdateLimits) -> dict[str, str]:
    """node_id -> reason, for updates whose norm exceeds ratio x the round's median."""
    if not limits.max_norm_ratio or len(updates) < limits.min_for_median:
        return {}
    norms = {u.node_id: update_norm(u) for u in updates}
    median = float(np.median(list(norms.values())))
    bound = limits.max_norm_ratio * median
    return {
        node: f"update norm {norm:.4g} exceeds {limits.max_norm_ratio:g} x the round median {median:.4g}"
        for node, norm in norms.items()
        if norm > bound
    }

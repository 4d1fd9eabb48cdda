"""How far the applied update is from the ideal one, without forming d x k per client.

The ideal update of a round is T = sum_k p_k s_k B_k A_k. What the server applies is
the new global adapter plus whatever it folded into the base weights this round.
Both are low-rank, so their difference is one stacked low-rank product and its
Frobenius norm costs O((d_out + d_in) q^2) instead of O(d_out d_in). Large runs
sample a few modules (``max_modules``) rather than all of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from aggregation.base import Aggregation, Aggregator, ClientUpdate
from aggregation.linalg import example_weights, lowrank_fro_norm, stack_lowrank


def ideal_update(
    aggregator: Aggregator, state: object, updates: Sequence[ClientUpdate], module: str
) -> dict[str, np.ndarray]:
    """T for one module as stacked factors: [p_k s_k B_k] and [A_k]."""
    weights = example_weights(updates)
    pairs = []
    for p, update in zip(weights, updates, strict=True):
        delta = aggregator.client_delta(state, update)[module]
        pairs.append((p * delta["B"], delta["A"]))
    return stack_lowrank(pairs)


def relative_error(
    aggregator: Aggregator,
    old_state: object,
    result: Aggregation,
    updates: Sequence[ClientUpdate],
    *,
    max_modules: int = 8,
) -> float:
    """||dW_applied - T||_F / ||T||_F, pooled over (up to) ``max_modules`` modules."""
    applied = aggregator.global_delta(result.state)
    # modules come from what clients trained: an aggregator that forgot a module in
    # global_delta must show up as an error, not silently as zero
    modules = sorted(updates[0].tensors) if updates else []
    if len(modules) > max_modules:
        # evenly spaced, deterministic sample: first, last and in between
        idx = np.linspace(0, len(modules) - 1, max_modules).round().astype(int)
        modules = [modules[i] for i in sorted(set(idx))]
    err_sq = 0.0
    ideal_sq = 0.0
    for name in modules:
        ideal = ideal_update(aggregator, old_state, updates, name)
        got = applied.get(name)
        pairs = [(-ideal["B"], ideal["A"])]
        if got is not None and got["B"].shape[1] > 0:
            pairs.append((got["B"], got["A"]))
        if name in result.base_update:
            pairs.append((result.base_update[name]["B"], result.base_update[name]["A"]))
        err_sq += lowrank_fro_norm(stack_lowrank(pairs)) ** 2
        ideal_sq += lowrank_fro_norm(ideal) ** 2
    if ideal_sq == 0.0:
        return 0.0 if err_sq == 0.0 else float("inf")
    return float(np.sqrt(err_sq / ideal_sq))

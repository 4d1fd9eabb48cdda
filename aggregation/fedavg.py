"""FedAvg on LoRA factors, FedIT-style (Zhang et al. 2024, "Towards Building the
Federated GPT: Federated Instruction Tuning", arXiv 2305.05644).

The server averages A and B separately, weighted by example counts. This is *not*
the average of the clients' updates: mean(B) @ mean(A) differs from mean(B @ A) by
the weighted covariance sum_k p_k (B_k - B_bar)(A_k - A_bar) (exact when all A_k are
equal). The relative error is logged every round so users see it on their own run.

Heterogeneous ranks: factors are zero-padded to the maximum rank before averaging
and truncated to each client's rank on the way back. Components above a client's
rank are therefore averaged together with zeros from the lower-rank clients and
shrink by the total weight of the clients that have them. Documented as inexact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aggregation import register
from aggregation.base import (
    Aggregation,
    ClientInfo,
    ClientUpdate,
    Downlink,
    ModelSpec,
    Tensors,
)
from aggregation.init import lora_init
from aggregation.linalg import example_weights, fold, folded_lora, pad_to, truncated_downlink


@dataclass(frozen=True)
class FactorState:
    """Global folded factors at the maximum rank: B already multiplied by s."""

    factors: Tensors
    max_rank: int


def padded_weighted_mean(
    updates: Sequence[ClientUpdate], weights: np.ndarray, module: str, max_rank: int
) -> dict[str, np.ndarray]:
    """Weighted mean of zero-padded folded factors (s_k B_k, A_k) for one module."""
    first = updates[0].tensors[module]
    d_out, d_in = first["B"].shape[0], first["A"].shape[1]
    b_mean = np.zeros((d_out, max_rank))
    a_mean = np.zeros((max_rank, d_in))
    for p, update in zip(weights, updates, strict=True):
        b_mean += p * pad_to(fold(update, "B", module), (d_out, max_rank))
        a_mean += p * pad_to(np.asarray(update.tensors[module]["A"], np.float64), (max_rank, d_in))
    return {"A": a_mean, "B": b_mean}


@register("fedavg")
class FedAvg:
    """Weighted mean of A and B, zero-padded to the maximum rank."""

    uplink = frozenset({"A", "B"})
    adapter_kind = "lora"

    def init_state(self, spec: ModelSpec) -> FactorState:
        return FactorState(factors=lora_init(spec), max_rank=spec.max_rank)

    def downlink(self, state: FactorState, client: ClientInfo) -> Downlink:
        return truncated_downlink(state.factors, client, state.max_rank)

    def aggregate(self, state: FactorState, updates: Sequence[ClientUpdate]) -> Aggregation:
        weights = example_weights(updates)
        factors = {
            name: padded_weighted_mean(updates, weights, name, state.max_rank)
            for name in state.factors
        }
        return Aggregation(state=FactorState(factors=factors, max_rank=state.max_rank))

    def global_delta(self, state: FactorState) -> Tensors:
        return {name: dict(f) for name, f in state.factors.items()}

    def client_delta(self, state: FactorState, update: ClientUpdate) -> Tensors:
        return folded_lora(update)

"""FedAvg on LoRA factors, FedIT-style (Zhang et al. 2024, "Towards Building the
Federated GPT: Federated Instruction Tuning", arXiv 2305.05644).

The server averages A and B separately, weighted by example counts. This is *not*
the average of the clients' updates: mean(B) @ mean(A) differs from mean(B @ A) by
the weighted covariance sum_k p_k (B_k - B_bar)(A_k - A_bar) (exact when all A_k are
equal). The relative error is logged every round so users see it on their own run.

Heterogeneous ranks (FedIT assumes one rank): component j of the global adapter (row j
of A, column j of the folded B) is averaged over the participants that hold it
(r_k > j), with their p_k renormalised over that set; a component no participant
holds keeps its previous global value (``linalg.holder_weighted_mean``, the rule of
Fed-SB's per-entry mean in ``aggregation.fed_sb``). The zero-padded mean this
replaces shrank a component by the weight of the clients lacking it, and set it to
exactly zero in a round without any client of higher rank: both factors zero, so
their gradients are zero and the component never trains again. Clients get the first
r_k components ("truncation"). Still inexact (the covariance term above), and the
kept components are not part of any client's update, so they count in
``diagnostics.relative_error`` too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aggregation import register
from aggregation.base import (
    Recommended,
    WeightedSum,
    Aggregation,
    ClientInfo,
    ClientUpdate,
    Downlink,
    ModelSpec,
    Tensors,
)
from aggregation.seeded_init import lora_init
from aggregation.linalg import example_weights, folded_lora, holder_weighted_mean, truncated_downlink


@dataclass(frozen=True)
class FactorState:
    """Global folded factors at the maximum rank: B already multiplied by s."""

    factors: Tensors
    max_rank: int


@register("fedavg")
class FedAvg:
    """Weighted mean of A and B per component, over the clients that hold it."""

    uplink = frozenset({"A", "B"})
    adapter_kind = "lora"
    weighted_sum = WeightedSum(coverage={"A": "rows", "B": "cols"}, renormalised=True)  # per-component holder mean
    accepts_calibration = False
    recommended = Recommended(learning_rate=4e-3, source="simulations/tuning.json (python -m simulations.tune, "
                              "2026-12-01; grid 5e-4..1e-2)",
                              paper="FedIT (arXiv 2305.05644): its rate not checked offline")

    def init_state(self, spec: ModelSpec) -> FactorState:
        return FactorState(factors=lora_init(spec), max_rank=spec.max_rank)

    def downlink(self, state: FactorState, client: ClientInfo) -> Downlink:
        return truncated_downlink(state.factors, client, state.max_rank)

    def aggregate(self, state: FactorState, updates: Sequence[ClientUpdate]) -> Aggregation:
        weights = example_weights(updates)
        factors = {
            name: holder_weighted_mean(previous, updates, weights, name)
            for name, previous in state.factors.items()
        }
        return Aggregation(state=FactorState(factors=factors, max_rank=state.max_rank))

    def global_delta(self, state: FactorState) -> Tensors:
        return {name: dict(f) for name, f in state.factors.items()}

    def client_delta(self, state: FactorState, update: ClientUpdate) -> Tensors:
        return folded_lora(update)

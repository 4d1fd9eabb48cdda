"""HetLoRA: sparsity-weighted aggregation of mixed-rank LoRA factors (Cho et al. 2024,
"Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
arXiv 2401.06432).

Why: with mixed ranks, zero-padded FedAvg (the paper's baseline) weights a client
only by its data size, so updates that carry little (a low-rank, zero-padded update
is mostly zeros; a client that barely moved has a small update) pull the global
factors towards zero as hard as updates that carry a lot. HetLoRA weights each
client by the size of its update instead:
``w_k = ||s_k B_k A_k||_F / sum_j ||s_j B_j A_j||_F``, computed per module (the paper
states it for one LoRA matrix; we apply it to each adapted module separately) on the
folded update, so alpha and rank scalings count. The
norm is taken on the low-rank factors (``linalg.lowrank_fro_norm``), never densely.

The paper's weight is the norm alone, with no example counts. We follow it by
default; ``weight_by_examples=True`` uses ``n_k * ||s_k B_k A_k||_F`` (normalised),
an option for federations whose data sizes differ a lot. If every client's update
of a module is exactly zero, the norms say nothing and we fall back to p_k.

Aggregation, where we deviate from the paper: the paper zero-pads the folded factors
``s_k B_k`` and ``A_k`` to max_rank and averages them with these weights. Zero padding
shrinks each component by the weight of the clients that lack it, and in a round where
no participant has rank above r it sets components r and above to exactly zero (both
factors, so their gradients are zero and they never train again). We average each
component (row j of A, column j of s B) over the participants that hold it, with w_k
renormalised over them, and keep the previous global value where none does
(``linalg.holder_weighted_mean``, shared with FedAvg and the rule of Fed-SB's per-entry
mean). With equal ranks at max_rank this is the paper's aggregate exactly. A client
with w_k = 0 (a zero update) counts as holding nothing. The server sends each client
the first r_k components ("truncation"). Like FedAvg this averages factors, not
products, so it is inexact (the weighted covariance of the factors). Note that
``diagnostics.relative_error`` measures against T with example weights p_k, so for
HetLoRA it also includes the deliberate difference between w_k and p_k.

Not implemented: the paper's local rank self-pruning (a client drops trailing
components whose norm is small and reports a smaller rank). It is a client-side
training rule; this server side already accepts any rank <= max_rank each round,
so a client that prunes just reports the smaller rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aggregation import register
from aggregation.base import (
    Recommended,
    Aggregation,
    ClientInfo,
    ClientUpdate,
    Downlink,
    ModelSpec,
    Tensors,
)
from aggregation.seeded_init import lora_init
from aggregation.linalg import (
    example_weights,
    fold,
    folded_lora,
    holder_weighted_mean,
    lowrank_fro_norm,
    truncated_downlink,
)


@dataclass(frozen=True)
class HetState:
    """Folded global factors at max rank (B multiplied by s), as in FedAvg."""

    factors: Tensors
    max_rank: int


def sparsity_weights(
    updates: Sequence[ClientUpdate], module: str, *, weight_by_examples: bool = False
) -> np.ndarray:
    """w_k proportional to ||s_k B_k A_k||_F (times n_k if asked), summing to 1."""
    p = example_weights(updates)
    norms = np.array(
        [
            lowrank_fro_norm({"B": fold(u, "B", module), "A": u.tensors[module]["A"]})
            for u in updates
        ]
    )
    raw = norms * p if weight_by_examples else norms
    total = raw.sum()
    if total == 0.0:
        return p  # all updates zero: nothing to tell them apart but their data
    return raw / total


@register("hetlora")
class HetLoRA:
    """Per-component factor averaging, weighted by the Frobenius norm of each update."""

    uplink = frozenset({"A", "B"})
    adapter_kind = "lora"
    weighted_sum = "its norm-based weights depend on the uploads themselves"
    accepts_calibration = False
    recommended = Recommended(
        learning_rate=0.004, source="simulations/tuning.json (python -m simulations.tune, 2026-12-01; "
                                    "grid 0.0015..0.01)",
        paper="HetLoRA (arXiv 2401.06432): its rate not checked offline")

    def __init__(self, *, weight_by_examples: bool = False) -> None:
        self.weight_by_examples = weight_by_examples

    def init_state(self, spec: ModelSpec) -> HetState:
        return HetState(factors=lora_init(spec, purpose="hetlora"), max_rank=spec.max_rank)

    def downlink(self, state: HetState, client: ClientInfo) -> Downlink:
        return truncated_downlink(state.factors, client, state.max_rank)

    def aggregate(self, state: HetState, updates: Sequence[ClientUpdate]) -> Aggregation:
        factors = {}
        for name, previous in state.factors.items():
            w = sparsity_weights(updates, name, weight_by_examples=self.weight_by_examples)
            factors[name] = holder_weighted_mean(previous, updates, w, name)
        return Aggregation(state=HetState(factors=factors, max_rank=state.max_rank))

    def global_delta(self, state: HetState) -> Tensors:
        return {name: {"B": f["B"].copy(), "A": f["A"].copy()} for name, f in state.factors.items()}

    def client_delta(self, state: HetState, update: ClientUpdate) -> Tensors:
        return folded_lora(update)

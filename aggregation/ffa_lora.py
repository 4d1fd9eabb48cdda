"""FFA-LoRA: freeze A, train and average only B (Sun et al. 2024, "Improving LoRA in
Privacy-preserving Federated Learning", arXiv 2403.12313).

Why: FedAvg on (A, B) is inexact because mean(B) @ mean(A) != mean(B @ A) whenever
the clients' A differ. If A never changes and every client holds the same A, the
update is linear in B: ``(sum_k p_k s_k B_k) A = sum_k p_k s_k B_k A``, so averaging
B is exactly averaging the updates. The paper's other argument is for DP: with A
fixed, DP-SGD noise enters only B, and a product of two noisy factors (which
amplifies noise) never arises. It also halves the upload.

A is drawn once from the run seed with PEFT's kaiming-uniform init
(``aggregation.seeded_init.lora_init``) and delivered to each node once as a frozen factor.

Heterogeneous ranks: client k uses ``A[:r_k]`` and trains a ``d_out x r_k`` B. The
server zero-pads the folded ``s_k B_k`` to max_rank columns before averaging, which
keeps the aggregate equal to T = sum_k p_k s_k B_k A[:r_k]: a client without
component i contributes nothing there. The price is the same as FedAvg's padding:
component i of the global B is the weighted sum over only the clients that have
it (no renormalisation), so high components shrink by the total weight of those
clients each round. That is what T asks for; it is documented, not hidden.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aggregation import register
from aggregation.base import (
    Recommended,
    check_rank,
    WeightedSum,
    Aggregation,
    ClientInfo,
    ClientUpdate,
    Downlink,
    ModelSpec,
    Tensors,
)
from aggregation.seeded_init import lora_init
from aggregation.linalg import example_weights, fold, pad_to


@dataclass(frozen=True)
class FrozenAState:
    """Per module: frozen ``A`` (m x d_in) and the folded global ``B`` (d_out x m)."""

    factors: Tensors
    max_rank: int


def padded_b_mean(
    updates: Sequence[ClientUpdate], weights: np.ndarray, module: str, d_out: int, max_rank: int
) -> np.ndarray:
    """sum_k p_k pad(s_k B_k): zero columns where a client's rank ends."""
    out = np.zeros((d_out, max_rank))
    for p, update in zip(weights, updates, strict=True):
        b = fold(update, "B", module)
        if b.shape[1] != update.rank:
            raise ValueError(
                f"node {update.node_id}: B for {module} has {b.shape[1]} columns, "
                f"rank is {update.rank}"
            )
        out += p * pad_to(b, (d_out, max_rank))
    return out


@register("ffa-lora")
class FFALoRA:
    """A frozen and shared, B averaged: exact aggregation of B @ A."""

    uplink = frozenset({"B"})
    adapter_kind = "lora"
    weighted_sum = WeightedSum(coverage={"B": "cols"}, renormalised=False)
    accepts_calibration = False
    recommended = Recommended(
        learning_rate=0.004, source="simulations/tuning.json (python -m simulations.tune, 2026-12-01; "
                                    "grid 0.0015..0.01)",
        paper="FFA-LoRA (arXiv 2403.12313): its rate not checked offline")

    def init_state(self, spec: ModelSpec) -> FrozenAState:
        # B = 0: the initial update is zero, as with PEFT's default init
        return FrozenAState(factors=lora_init(spec, purpose="ffa-lora"), max_rank=spec.max_rank)

    def downlink(self, state: FrozenAState, client: ClientInfo) -> Downlink:
        r = client.rank
        check_rank(r, state.max_rank, node=client.node_id)
        adapter = {name: {"B": f["B"][:, :r] / client.scale} for name, f in state.factors.items()}
        frozen = {name: {"A": f["A"][:r].copy()} for name, f in state.factors.items()}
        return Downlink(adapter=adapter, trainable=frozenset({"B"}), frozen=frozen)

    def aggregate(self, state: FrozenAState, updates: Sequence[ClientUpdate]) -> Aggregation:
        weights = example_weights(updates)
        factors = {
            name: {
                "A": f["A"],  # frozen for the whole run
                "B": padded_b_mean(updates, weights, name, f["B"].shape[0], state.max_rank),
            }
            for name, f in state.factors.items()
        }
        return Aggregation(state=FrozenAState(factors=factors, max_rank=state.max_rank))

    def global_delta(self, state: FrozenAState) -> Tensors:
        return {name: {"B": f["B"].copy(), "A": f["A"].copy()} for name, f in state.factors.items()}

    def client_delta(self, state: FrozenAState, update: ClientUpdate) -> Tensors:
        # the upload is B only: A is the shared frozen one the client trained with
        return {
            name: {"B": fold(update, "B", name), "A": f["A"][: update.rank].copy()}
            for name, f in state.factors.items()
        }

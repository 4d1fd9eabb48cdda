"""FedEx-LoRA: FedAvg on the factors plus the exact residual in the base weights
(Singhal, Ponkshe and Vepakomma 2024, "FedEx-LoRA: Exact Aggregation for Federated and
Efficient Fine-Tuning of Foundation Models", arXiv 2410.09432).

Why: FedAvg's mean(B) @ mean(A) misses the ideal update T = sum_k p_k s_k B_k A_k by
the weighted covariance of the factors. FedEx-LoRA keeps the averaged factors as the
next adapter (so clients warm-start, unlike FLoRA's fresh adapters) and adds the
error ``T - B_bar A_bar`` to the frozen base weights, which makes the global model
exactly ``W0 + T`` after every round.

The paper adds the residual as a dense d_out x d_in matrix. It is low-rank, and
sending it low-rank is what the protocol asks for::

    T - B_bar A_bar = [p_1 s_1 B_1 | ... | p_n s_n B_n | -B_bar] @ [A_1; ...; A_n; A_bar]

(rank sum_k r_k + max_rank). Applying it on top of the global adapter gives
``B_bar A_bar + (T - B_bar A_bar) = T`` exactly, for mixed ranks and alphas.

Heterogeneous ranks: the adapter part is FedAvg's per-component mean (see
``aggregation.fedavg``): each component is averaged over the participants that hold it,
and one that no participant holds keeps its previous value, so it stays alive in the
adapter for the next high-rank client. The residual is taken against these new factors,
kept components included: their product enters the residual with a minus sign, so
after the round the model is still exactly ``W0 + (earlier base updates) + T``. The
downlink is truncated to each client's rank, so a rank-r client starts from the global
model minus the adapter's components r and above (a limit of truncation, not of the
residual).
"""

from __future__ import annotations

from collections.abc import Sequence

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
from aggregation.fedavg import FactorState, FedAvg
from aggregation.flora import stacked_update
from aggregation.linalg import check_lora_update, example_weights


def residual_update(
    updates: Sequence[ClientUpdate], weights: np.ndarray, module: str, mean: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``T - B_bar A_bar`` for one module as stacked low-rank factors."""
    return stacked_update(updates, weights, module, extra=[(-mean["B"], mean["A"])])


@register("fedex-lora")
class FedExLoRA:
    """FedAvg factors as the adapter, the exact residual folded into the base weights."""

    uplink = FedAvg.uplink
    adapter_kind = FedAvg.adapter_kind
    weighted_sum = "its residual base update is a product of client factors, not a sum"
    accepts_calibration = False
    recommended = Recommended(
        learning_rate=0.0015, source="simulations/tuning.json (python -m simulations.tune, 2026-12-01; "
                                    "grid 0.0005..0.01)",
        paper="FedEx-LoRA (arXiv 2410.09432): its rate not checked offline")

    def __init__(self) -> None:
        # The adapter half is FedAvg, unchanged: state, downlink and deltas are its own.
        self._fedavg = FedAvg()

    def init_state(self, spec: ModelSpec) -> FactorState:
        return self._fedavg.init_state(spec)

    def downlink(self, state: FactorState, client: ClientInfo) -> Downlink:
        return self._fedavg.downlink(state, client)

    def aggregate(self, state: FactorState, updates: Sequence[ClientUpdate]) -> Aggregation:
        # Sorted by node so the logged residual is bit-identical whatever the reply order.
        ordered = sorted(updates, key=lambda u: u.node_id)
        shapes = {n: (f["B"].shape[0], f["A"].shape[1]) for n, f in state.factors.items()}
        for update in ordered:
            check_lora_update(update, shapes)
        averaged = self._fedavg.aggregate(state, ordered).state
        weights = example_weights(ordered)
        base_update = {
            name: residual_update(ordered, weights, name, mean) for name, mean in averaged.factors.items()
        }
        return Aggregation(state=averaged, base_update=base_update)

    def global_delta(self, state: FactorState) -> Tensors:
        return self._fedavg.global_delta(state)

    def client_delta(self, state: FactorState, update: ClientUpdate) -> Tensors:
        return self._fedavg.client_delta(state, update)

"""RoLoRA: alternate which LoRA factor the federation trains (Chen et al. 2025, "Robust
Federated Finetuning of LLMs via Alternating Optimization of LoRA", NeurIPS 2025,
arXiv 2502.01755; the alternation of LoRA-A², Koo et al. 2024, arXiv 2410.22815).

Why: FedAvg on (A, B) is inexact because mean(B) @ mean(A) != mean(B @ A) when both
factors differ between clients. If in a round only one factor trains and the other is
the same on every client, the round is linear in the trained factor and averaging it is
averaging the updates:

* B-round (A frozen and shared): ``sum_k p_k (s_k B_k) A = (sum_k p_k s_k B_k) A``;
* A-round (B frozen and shared, folded ``B_g = s_k * (B_g / s_k)`` on every client):
  ``sum_k p_k B_g A_k = B_g (sum_k p_k A_k)``.

Unlike FFA-LoRA, A still learns (every other round), and each upload is one factor:
half of FedAvg's. The phase is the number of rounds aggregated so far (``state.step``):
even -> B-round, odd -> A-round, so the first round trains B (with PEFT's B = 0, an
A-round would have zero gradient), and a round the server had to skip repeats its phase
rather than shifting the alternation. Each round's upload is in ``Downlink.uplink``.

Heterogeneous ranks. The server keeps one global adapter at max_rank m: folded
``B_g`` (d_out x m) and ``A_g`` (m x d_in). Client k (rank r_k) holds components
0..r_k-1 of it: ``A_g[:r_k]`` and ``B_g[:, :r_k] / s_k``, and trains only the round's
factor of those components; the other factor's first r_k components are shared with
every other client that holds them. Components r_k..m-1 are not in its model at all.
The trained factor is averaged per component over the clients that hold it
(``linalg.component_mean``: weights renormalised over the holders; a component no
participant holds keeps its value), the rule FedAvg uses here. With equal ranks that is
exactly the mean of the products above. With mixed ranks component j of the result is
the holders' mean of component j, while the ideal T = sum_k p_k s_k B_k A_k zero-pads,
which would scale component j by the holders' total weight; the recorded relative error
is that difference. Zero padding would also set a component to 0 in a round without a
holder, and a component whose B and A are both 0 never gets a gradient again.
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
    check_rank,
)
from aggregation.linalg import component_mean, example_weights, fold, truncate_lora, unfold_for
from aggregation.seeded_init import lora_init

#: the factor each phase trains and uploads (phase = rounds aggregated so far, mod 2)
PHASES = ("B", "A")


@dataclass(frozen=True)
class AlternatingState:
    """Folded global factors at max rank and how many rounds have been aggregated."""

    factors: Tensors
    max_rank: int
    step: int = 0

    @property
    def trained(self) -> str:
        return PHASES[self.step % len(PHASES)]


@register("rolora")
class RoLoRA:
    """B-rounds and A-rounds in turn, the other factor shared: each round's mean is exact."""

    uplink = frozenset({"A", "B"})  # the union; each round asks for one (Downlink.uplink)
    adapter_kind = "lora"
    weighted_sum = ("its upload alternates between B and A by round, while central DP's layout is one "
                    "per method: it would also noise the factor that is frozen and shared that round")
    accepts_calibration = False

    def init_state(self, spec: ModelSpec) -> AlternatingState:
        # random A, B = 0: the initial update is zero, as with PEFT's default init
        return AlternatingState(factors=lora_init(spec, purpose="rolora"), max_rank=spec.max_rank)

    def downlink(self, state: AlternatingState, client: ClientInfo) -> Downlink:
        check_rank(client.rank, state.max_rank, node=client.node_id)
        adapter = {
            name: unfold_for(truncate_lora(f, client.rank), scale=client.scale, into="B")
            for name, f in state.factors.items()
        }
        phase = frozenset({state.trained})
        return Downlink(adapter=adapter, trainable=phase, uplink=phase)

    def aggregate(self, state: AlternatingState, updates: Sequence[ClientUpdate]) -> Aggregation:
        weights = example_weights(updates)
        factor = state.trained
        missing = [u.node_id for u in updates if any(factor not in f for f in u.tensors.values())]
        if missing:
            raise ValueError(f"rolora round {state.step} trains {factor}, but nodes {missing} did not upload it")
        factors = {}
        for name, f in state.factors.items():
            parts = ((p, _upload(u, name, factor)) for p, u in zip(weights, updates, strict=True))
            if factor == "B":  # folded s_k B_k; component j is column j
                factors[name] = {"A": f["A"], "B": component_mean(f["B"], parts, along="cols")}
            else:  # A carries no scale; component j is row j
                factors[name] = {"A": component_mean(f["A"], parts, along="rows"), "B": f["B"]}
        return Aggregation(state=AlternatingState(factors=factors, max_rank=state.max_rank, step=state.step + 1))

    def global_delta(self, state: AlternatingState) -> Tensors:
        return {name: {"B": f["B"].copy(), "A": f["A"].copy()} for name, f in state.factors.items()}

    def client_delta(self, state: AlternatingState, update: ClientUpdate) -> Tensors:
        # the upload is one factor; the other is the shared one the client was sent
        r = update.rank
        if state.trained == "B":
            return {name: {"B": fold(update, "B", name), "A": f["A"][:r].copy()} for name, f in state.factors.items()}
        return {name: {"B": f["B"][:, :r].copy(), "A": np.asarray(update.tensors[name]["A"], np.float64)}
                for name, f in state.factors.items()}


def _upload(update: ClientUpdate, module: str, factor: str) -> np.ndarray:
    """The round's factor as the server mixes it (B folded), checked against the node's rank."""
    value = fold(update, "B", module) if factor == "B" else np.asarray(update.tensors[module]["A"], np.float64)
    held = value.shape[1] if factor == "B" else value.shape[0]
    if held != update.rank:
        raise ValueError(f"node {update.node_id}: {factor} for {module} has shape {value.shape}, "
                         f"rank is {update.rank}")
    return value

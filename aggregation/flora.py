"""FLoRA: stacking-based aggregation of heterogeneous LoRA adapters (Wang et al. 2024,
"FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024, arXiv 2409.05976).

Why stacking: averaging A and B separately (FedAvg) does not average the products,
because mean(B) @ mean(A) != mean(B @ A). But a sum of low-rank products *is* one
low-rank product of the concatenated factors::

    sum_k p_k s_k B_k A_k = [p_1 s_1 B_1 | ... | p_n s_n B_n] @ [A_1; ...; A_n]

so the server can apply the ideal update T exactly, for any mix of ranks and alphas,
and under partial participation (p_k is over the clients that replied). The stacked
rank is sum_k r_k, which grows with the number of clients, so the stack is not kept as
an adapter: it is folded into every client's base weights (``Aggregation.base_update``)
and each client starts the next round from a fresh adapter at its own rank with PEFT's
default init (random A, zero B). Clients therefore never need a common rank.

What the official code gets wrong (github.com/ATP-1010/FederatedLLM,
``fed_utils/model_aggregation.py`` and ``main.py``): it concatenates the raw client
factors, weights only A by p_k, and loads the stack as one PEFT adapter configured
with ``r = lora_r * num_clients`` and ``lora_alpha = lora_alpha * num_clients``. That
adapter applies the single scale ``lora_alpha / lora_r`` to every client's block, so
the result equals T only when (a) the client ranks sum to ``lora_r * num_clients`` --
otherwise the stacked tensors do not fit the configured rank (the "rank mismatch" of
the repository's issue #9), and sampling fewer clients per round breaks it too -- and
(b) every client's alpha/r equals ``lora_alpha / lora_r``. Heterogeneous clients there
train with ``alpha = 2 r`` (scale 2) whatever ``lora_alpha`` and ``lora_r`` are, so
they agree only by the coincidence ``lora_alpha = 2 lora_r``; issue #16 reports this
mismatch between the server's and the clients' alpha/r. Here each block carries its
own ``p_k * s_k`` folded into B (the convention of ``aggregation.base``), so the stack
multiplies out to T whatever the ranks, alphas and participants are.

State: only a round counter and the module shapes (needed to report the zero-rank
global adapter). The history of merged stacks lives in the platform strategy's log of
base updates, which delivers to each node the entries it has not yet applied; keeping
it here as well would duplicate gigabytes per checkpoint.
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
from aggregation.linalg import check_lora_update, example_weights, folded_lora


@dataclass(frozen=True, kw_only=True)
class FloraState:
    """Rounds aggregated so far and the run's module shapes; no adapter persists."""

    rounds: int
    shapes: dict[str, tuple[int, int]]


def stacked_update(
    updates: Sequence[ClientUpdate],
    weights: np.ndarray,
    module: str,
    extra: Sequence[tuple[np.ndarray, np.ndarray]] = (),
) -> dict[str, np.ndarray]:
    """[p_1 s_1 B_1 | ... | p_n s_n B_n | extra B's] and [A_1; ...; A_n; extra A's].

    Written block by block into preallocated float64 arrays: the stack is the largest
    thing a round produces (rank sum_k r_k), and building it from a list of folded
    copies would hold it twice.
    """
    first = updates[0].tensors[module]
    d_out, d_in = first["B"].shape[0], first["A"].shape[1]
    rank = sum(u.rank for u in updates) + sum(a.shape[0] for _, a in extra)
    b_stack = np.empty((d_out, rank))
    a_stack = np.empty((rank, d_in))
    at = 0
    for p, update in zip(weights, updates, strict=True):
        factors = update.tensors[module]
        r = update.rank
        np.multiply(factors["B"], p * update.scale, out=b_stack[:, at : at + r])
        a_stack[at : at + r] = factors["A"]
        at += r
    for b, a in extra:
        r = a.shape[0]
        b_stack[:, at : at + r] = b
        a_stack[at : at + r] = a
        at += r
    return {"B": b_stack, "A": a_stack}


def zero_rank(d_out: int, d_in: int) -> dict[str, np.ndarray]:
    """An empty low-rank product (q = 0): the global adapter right after a merge."""
    return {"B": np.zeros((d_out, 0)), "A": np.zeros((0, d_in))}


@register("flora")
class FLoRA:
    """Stack p_k s_k B_k and A_k into a base-weight update; clients restart fresh."""

    uplink = frozenset({"A", "B"})
    adapter_kind = "lora"
    weighted_sum = ("its aggregate is a concatenation (stack) of the clients' factors, so every client's "
                    "factors are released verbatim; noise on a sum cannot hide them")
    accepts_calibration = False
    recommended = Recommended(
        learning_rate=0.01, source="simulations/tuning.json (python -m simulations.tune, 2026-12-01; "
                                    "grid 0.0015..0.025)",
        paper="FLoRA (arXiv 2409.05976): its rate not checked offline")

    def init_state(self, spec: ModelSpec) -> FloraState:
        shapes = {name: (s.d_out, s.d_in) for name, s in sorted(spec.modules.items())}
        return FloraState(rounds=0, shapes=shapes)

    def downlink(self, state: FloraState, client: ClientInfo) -> Downlink:
        # Empty adapter = fresh PEFT init at the client's own rank: everything learnt so
        # far is already in the base weights through the logged base updates.
        return Downlink(adapter={}, trainable=frozenset({"A", "B"}))

    def aggregate(self, state: FloraState, updates: Sequence[ClientUpdate]) -> Aggregation:
        # Sorted by node so the logged stack is bit-identical whatever the reply order.
        ordered = sorted(updates, key=lambda u: u.node_id)
        for update in ordered:
            check_lora_update(update, state.shapes)
        weights = example_weights(ordered)
        base_update = {name: stacked_update(ordered, weights, name) for name in state.shapes}
        new_state = FloraState(rounds=state.rounds + 1, shapes=dict(state.shapes))
        return Aggregation(state=new_state, base_update=base_update)

    def global_delta(self, state: FloraState) -> Tensors:
        # Zero-rank but present for every module, so diagnostics still visit each one.
        return {name: zero_rank(d_out, d_in) for name, (d_out, d_in) in state.shapes.items()}

    def client_delta(self, state: FloraState, update: ClientUpdate) -> Tensors:
        # The adapter started at B = 0, so the whole adapter is this round's update.
        return folded_lora(update)

"""FedSA-LoRA: share A, keep each client's B on its node (Guo et al. 2025, "Selective
Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025, arXiv 2410.01463).

Why: the paper's analysis and experiments find that A learns what the clients have in
common and B what is specific to each client's data. So clients train both factors,
upload only A, and the server averages A; each client keeps its own B across rounds.
The result is a personalised model per client, ``W0 + s_k B_k A``, not one global
model. Upload is A only; download is the shared A only.

What the server holds and evaluates. The state is the shared A (m x d_in) and nothing
else: B never leaves a node (``Downlink.uplink`` = {"A"}, trainable {"A", "B"}; the
node stores its B itself, ``client.personal``). Without any B the server has no
adapter to evaluate: ``global_delta`` is a rank-0 adapter (the base model), so the
server-side held-out evaluation of a FedSA-LoRA run measures the base model, and the
export of the plain global adapter has nothing to write. The paper evaluates each
client's personalised model on that client's data, and so do the nodes here: each
reports the loss of its just-trained adapter on a held-out slice of its own examples
(``personal-eval-loss`` in its reply metrics, recorded per client row), and
``fedlora export RUN --node NAME`` writes one node's adapter (the shared A with its B).
For the same reason the server cannot know a client's adapter: ``client_delta`` has a
NaN B, and the round's relative error is NaN (recorded as NULL).

Averaging A is exact for what the server aggregates (the mean of the A's, per
component over the clients that hold it when ranks differ: ``linalg.component_mean``);
there is no product to be exact about, since every client multiplies A by its own B.

Heterogeneous ranks: client k gets ``A[:r_k]``, trains a rank-r_k adapter, keeps a
d_out x r_k B and uploads r_k x d_in. Row j of the shared A is averaged over the
clients of rank > j (weights renormalised), rows nobody trained keep their value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    WeightedSum,
    check_rank,
)
from aggregation.linalg import component_mean, example_weights, fold
from aggregation.seeded_init import lora_init


@dataclass(frozen=True)
class SharedAState:
    """Per module the shared ``A`` (m x d_in); ``d_out`` per module to shape the rank-0 global adapter."""

    factors: Tensors
    d_out: Mapping[str, int]
    max_rank: int


@register("fedsa-lora")
class FedSALoRA:
    """A averaged; each B stays on its node: a personalised model per client."""

    uplink = frozenset({"A"})
    adapter_kind = "lora"
    weighted_sum = WeightedSum(coverage={"A": "rows"}, renormalised=True)  # per-component holder mean of A
    accepts_calibration = False

    def init_state(self, spec: ModelSpec) -> SharedAState:
        # PEFT's kaiming A, drawn once from the run seed so every client starts from the same one
        factors = {name: {"A": f["A"]} for name, f in lora_init(spec, purpose="fedsa-lora").items()}
        return SharedAState(factors=factors, d_out={n: s.d_out for n, s in spec.modules.items()},
                            max_rank=spec.max_rank)

    def downlink(self, state: SharedAState, client: ClientInfo) -> Downlink:
        check_rank(client.rank, state.max_rank, node=client.node_id)
        adapter = {name: {"A": f["A"][: client.rank].copy()} for name, f in state.factors.items()}
        return Downlink(adapter=adapter, trainable=frozenset({"A", "B"}), uplink=self.uplink)

    def aggregate(self, state: SharedAState, updates: Sequence[ClientUpdate]) -> Aggregation:
        weights = example_weights(updates)
        carrying_b = sorted(u.node_id for u in updates if any("B" in f for f in u.tensors.values()))
        if carrying_b:
            raise ValueError(f"nodes {carrying_b} uploaded B: fedsa-lora keeps B on the node")
        factors = {}
        for name, f in state.factors.items():
            parts = ((p, _uploaded_a(u, name)) for p, u in zip(weights, updates, strict=True))
            factors[name] = {"A": component_mean(f["A"], parts, along="rows")}
        return Aggregation(state=SharedAState(factors=factors, d_out=dict(state.d_out), max_rank=state.max_rank))

    def global_delta(self, state: SharedAState) -> Tensors:
        # no B on the server: a rank-0 adapter, the base model (module docstring)
        return {name: {"B": np.zeros((state.d_out[name], 0)), "A": np.zeros((0, f["A"].shape[1]))}
                for name, f in state.factors.items()}

    def client_delta(self, state: SharedAState, update: ClientUpdate) -> Tensors:
        # An upload has no B: the client's adapter, and the round's relative error, are unknown
        # (NaN). On the node's machine its kept B is given (``fedlora export RUN --node NAME``).
        return {
            name: {"B": fold(update, "B", name) if "B" in update.tensors[name]
                   else np.full((state.d_out[name], update.rank), np.nan), "A": _uploaded_a(update, name)}
            for name in state.factors
        }


def _uploaded_a(update: ClientUpdate, module: str) -> np.ndarray:
    a = np.asarray(update.tensors[module]["A"], dtype=np.float64)
    if a.shape[0] != update.rank:
        raise ValueError(f"node {update.node_id}: A for {module} has {a.shape[0]} rows, rank is {update.rank}")
    return a

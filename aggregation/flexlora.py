"""FlexLoRA: average the full update, hand each client its best rank-r_k part (Bai et
al. 2024, "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks
and Client Resources", arXiv 2402.11505).

Why: averaging factors (FedAvg/FedIT) is inexact and, with mixed ranks, ties the
global adapter to what the smallest client can represent ("bucket effect"). FlexLoRA
averages the *products*: T = sum_k p_k s_k B_k A_k, which is exact and lets a
high-rank client contribute all of its components. Each client then receives the
truncated SVD of T at its own rank, the best rank-r_k approximation (Eckart-Young):
a weak client is not dragged down to a lower common rank and a strong one is not
capped by the weakest.

T is never formed densely. It is the stacked product ``[p_k s_k B_k] @ [A_k]`` of
inner dimension sum_k r_k, and ``aggregation.lowrank.lowrank_svd`` takes its SVD via
QR of both stacks in O((d_out + d_in) q^2), q = sum_k r_k.

State: the top ``max_rank`` SVD components of T, folded, and their singular values.
Components beyond max_rank are discarded (the global adapter is rank max_rank), so
``relative_error`` reports exactly the Eckart-Young tail of T beyond max_rank.

Split of the singular values: by default all of S goes into B (``B = U_r S_r``,
``A = V_r^T``; ``split="sqrt"`` gives ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``).
The product, hence every model, is the same either way. We default to S-in-B, which
is how we read the paper's redistribution step (we could not re-check the text or
code from here), for a training reason: components with zero singular value keep
orthonormal A rows and zero B columns, which is PEFT's own "B = 0, A random" start,
so the client can still learn them; with the sqrt split both factors of such a
component are zero and its gradient is zero forever. When T has fewer than
max_rank components (few or low-rank clients replied), the missing ones are filled
the same way: B = 0 and the seeded kaiming A rows of the initial adapter.
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
from aggregation.seeded_init import kaiming_a, lora_init, module_rng
from aggregation.linalg import example_weights, fold, folded_lora, stack_lowrank, truncated_downlink
from aggregation.lowrank import lowrank_svd, truncated_factors

_PURPOSE = "flexlora"


@dataclass(frozen=True)
class SVDState:
    """Folded top-max_rank SVD factors of the last aggregate, per module.

    ``singular_values[module]`` has max_rank entries (zeros where T had fewer
    components). ``seed`` re-creates the fill rows for A (see module docstring).
    """

    factors: Tensors
    singular_values: dict[str, np.ndarray]
    max_rank: int
    seed: int


def weighted_stack(
    updates: Sequence[ClientUpdate], weights: np.ndarray, module: str
) -> dict[str, np.ndarray]:
    """T for one module as stacked factors ``[p_k s_k B_k]`` and ``[A_k]``."""
    pairs = []
    for p, update in zip(weights, updates, strict=True):
        b = fold(update, "B", module)
        a = np.asarray(update.tensors[module]["A"], dtype=np.float64)
        if b.shape[1] != update.rank or a.shape[0] != update.rank:
            raise ValueError(
                f"node {update.node_id}: {module} has B {b.shape}, A {a.shape}, "
                f"rank {update.rank}"
            )
        pairs.append((p * b, a))
    return stack_lowrank(pairs)


@register("flexlora")
class FlexLoRA:
    """Exact weighted average of B @ A, redistributed by truncated SVD per client rank."""

    uplink = frozenset({"A", "B"})
    adapter_kind = "lora"
    weighted_sum = "its SVD truncation is nonlinear in the uploads"
    accepts_calibration = False
    recommended = Recommended(
        learning_rate=0.004, source="simulations/tuning.json (python -m simulations.tune, 2026-12-01; "
                                    "grid 0.0015..0.01)",
        paper="FlexLoRA (arXiv 2402.11505): its rate not checked offline")

    def __init__(self, *, split: str = "b") -> None:
        if split not in ("b", "sqrt"):
            raise ValueError(f"unknown split {split!r}; expected 'b' or 'sqrt'")
        self.split = split

    def init_state(self, spec: ModelSpec) -> SVDState:
        factors = lora_init(spec, purpose=_PURPOSE)
        return SVDState(
            factors=factors,
            singular_values={name: np.zeros(spec.max_rank) for name in factors},
            max_rank=spec.max_rank,
            seed=spec.seed,
        )

    def downlink(self, state: SVDState, client: ClientInfo) -> Downlink:
        return truncated_downlink(state.factors, client, state.max_rank)

    def aggregate(self, state: SVDState, updates: Sequence[ClientUpdate]) -> Aggregation:
        weights = example_weights(updates)
        factors: Tensors = {}
        singular_values: dict[str, np.ndarray] = {}
        for name in state.factors:
            stacked = weighted_stack(updates, weights, name)
            u, s, vt = lowrank_svd(stacked["B"], stacked["A"])
            factors[name] = self._fill(
                truncated_factors(u, s, vt, state.max_rank, split=self.split), state, name
            )
            singular_values[name] = np.zeros(state.max_rank)
            k = min(state.max_rank, s.shape[0])
            singular_values[name][:k] = s[:k]
        new = SVDState(
            factors=factors,
            singular_values=singular_values,
            max_rank=state.max_rank,
            seed=state.seed,
        )
        return Aggregation(state=new)

    @staticmethod
    def _fill(f: dict[str, np.ndarray], state: SVDState, name: str) -> dict[str, np.ndarray]:
        """Pad to max_rank with B = 0 and the seeded initial A rows (trainable, inert)."""
        k, m = f["B"].shape[1], state.max_rank
        if k == m:
            return f
        d_out, d_in = f["B"].shape[0], f["A"].shape[1]
        init_a = kaiming_a(module_rng(state.seed, name, _PURPOSE), m, d_in)
        return {
            "B": np.concatenate([f["B"], np.zeros((d_out, m - k))], axis=1),
            "A": np.concatenate([f["A"], init_a[k:]], axis=0),
        }

    def global_delta(self, state: SVDState) -> Tensors:
        return {name: {"B": f["B"].copy(), "A": f["A"].copy()} for name, f in state.factors.items()}

    def client_delta(self, state: SVDState, update: ClientUpdate) -> Tensors:
        return folded_lora(update)

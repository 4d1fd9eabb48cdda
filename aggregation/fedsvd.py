"""FedSVD: train B with A fixed, re-factorise the aggregate by SVD so A stays orthonormal
(Lee et al. 2025, "FedSVD: Adaptive Orthogonalization for Private Federated Learning
with LoRA", NeurIPS 2025, arXiv 2505.12805).

Why: with DP-SGD on both factors, the noise in B and the noise in A multiply in B @ A.
FFA-LoRA avoids that by freezing A for good, which fixes the directions the adapter can
use. FedSVD freezes A only within a round: clients train and upload B; the server
averages B (exact, A being shared: ``sum_k p_k s_k B_k A = B_bar A``) and writes the
product as ``B_bar A = U S V^T``, sending ``B = U S`` and ``A = V^T`` next round. A is
orthonormal, which bounds the per-example gradient of B (``||g A^T|| <= ||g||``) and so
what DP-SGD clips away, and its rows are the principal directions of the global update,
strongest first.

What the SVD can and cannot change: the row space of ``B_bar A`` lies in the row space
of A, so the span of A's rows is the span of the initial (random orthonormal) A for
the whole run; the SVD rotates within it, orders the directions by singular value and
keeps B's columns orthogonal. Since A has orthonormal rows, ``B_bar A = (U S Q^T) A``
with ``B_bar = U S Q^T`` (a d_out x m SVD, never d_out x d_in) and ``V^T = Q^T A``.

DP. Local DP-SGD needs nothing here: only B trains. Central DP (``privacy.central``)
adds its noise to the state's ``factors`` after ``aggregate``, and the state must then
hold nothing computed from the un-noised mean. So the state is the weighted sum itself,
``B_bar`` in the basis A the round trained in, and the SVD runs on what is read from it
(``downlink``, ``global_delta``, the next ``aggregate``): post-processing of the noised
sum. The price is one thin SVD per module per read, O(d_out m^2).

Heterogeneous ranks. Client k gets the first r_k components: ``A = V^T[:r_k]``
(orthonormal) and ``B = (U S)[:, :r_k] / s_k``, i.e. the best rank-r_k approximation
of the global adapter (Eckart-Young), and trains a d_out x r_k B. Component j (column j
of the folded B, in the shared orthonormal basis) is averaged over the clients that
hold it, weights renormalised, and kept where nobody holds it (``linalg.component_mean``,
the rule of FedAvg here): exact with equal ranks; with mixed ranks the recorded
relative error is the difference to T's zero padding, as for FedAvg.
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
    Factors,
    ModelSpec,
    Tensors,
    WeightedSum,
    check_rank,
)
from aggregation.linalg import component_mean, example_weights, fold
from aggregation.lowrank import random_orthonormal
from aggregation.seeded_init import module_rng


@dataclass(frozen=True)
class SumState:
    """Per module: orthonormal ``A`` (m x d_in), the basis the last round trained in, and
    the folded weighted mean ``B`` (d_out x m) of that round: the global adapter is B @ A."""

    factors: Tensors
    max_rank: int


def orthonormal_factors(b: np.ndarray, a: np.ndarray) -> Factors:
    """``{"B": U S, "A": Q^T A}`` with the same product as ``b @ a`` (``a``: orthonormal rows).

    ``b = U S Q^T`` is a thin SVD of the d_out x m factor, so the new A's rows are the
    right singular vectors of ``b @ a``, in decreasing order of singular value. Signs are
    fixed (each row of the new A has its largest entry positive), so the basis does not
    depend on the LAPACK build: a checkpoint resumed elsewhere sends the same factors.
    """
    m = a.shape[0]
    u, s, qt = np.linalg.svd(b, full_matrices=b.shape[0] < m)  # qt is m x m either way
    new_a = qt @ a
    signs = np.sign(new_a[np.arange(m), np.abs(new_a).argmax(axis=1)])
    signs[signs == 0] = 1.0
    new_b = np.zeros_like(b)
    new_b[:, : len(s)] = u[:, : len(s)] * (s * signs[: len(s)])
    return {"B": new_b, "A": signs[:, None] * new_a}


@register("fedsvd")
class FedSVD:
    """B averaged in a shared orthonormal basis; the product re-factorised by SVD every round."""

    uplink = frozenset({"B"})
    adapter_kind = "lora"
    weighted_sum = WeightedSum(coverage={"B": "cols"}, renormalised=True)  # per-component holder mean of B
    accepts_calibration = False

    def init_state(self, spec: ModelSpec) -> SumState:
        factors = {}
        for name, shape in sorted(spec.modules.items()):
            if spec.max_rank > shape.d_in:
                raise ValueError(f"fedsvd needs max-rank <= d_in for an orthonormal A; module {name} has "
                                 f"d_in {shape.d_in} < max-rank {spec.max_rank}")
            a = random_orthonormal(module_rng(spec.seed, name, "fedsvd"), shape.d_in, spec.max_rank).T
            factors[name] = {"A": np.ascontiguousarray(a), "B": np.zeros((shape.d_out, spec.max_rank))}
        return SumState(factors=factors, max_rank=spec.max_rank)

    def downlink(self, state: SumState, client: ClientInfo) -> Downlink:
        r = client.rank
        check_rank(r, state.max_rank, node=client.node_id)
        adapter = {}
        for name, f in state.factors.items():
            split = orthonormal_factors(f["B"], f["A"])
            adapter[name] = {"A": split["A"][:r].copy(), "B": split["B"][:, :r] / client.scale}
        return Downlink(adapter=adapter, trainable=frozenset({"B"}))

    def aggregate(self, state: SumState, updates: Sequence[ClientUpdate]) -> Aggregation:
        weights = example_weights(updates)
        factors = {}
        for name, f in state.factors.items():
            sent = orthonormal_factors(f["B"], f["A"])  # what every client trained from
            parts = ((p, _folded_b(u, name)) for p, u in zip(weights, updates, strict=True))
            factors[name] = {"A": sent["A"], "B": component_mean(sent["B"], parts, along="cols")}
        return Aggregation(state=SumState(factors=factors, max_rank=state.max_rank))

    def global_delta(self, state: SumState) -> Tensors:
        return {name: orthonormal_factors(f["B"], f["A"]) for name, f in state.factors.items()}

    def client_delta(self, state: SumState, update: ClientUpdate) -> Tensors:
        out = {}
        for name, f in state.factors.items():
            basis = orthonormal_factors(f["B"], f["A"])["A"]
            out[name] = {"B": _folded_b(update, name), "A": basis[: update.rank]}
        return out


def _folded_b(update: ClientUpdate, module: str) -> np.ndarray:
    b = fold(update, "B", module)
    if b.shape[1] != update.rank:
        raise ValueError(f"node {update.node_id}: B for {module} has {b.shape[1]} columns, rank is {update.rank}")
    return b

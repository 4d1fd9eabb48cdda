"""Fed-SB: federated LoRA-SB, averaging only the r x r matrix R (Singhal et al. 2025,
"Fed-SB: A Silver Bullet for Extreme Communication Efficiency and Performance in
(Private) Federated LoRA Fine-Tuning", arXiv 2502.15436; adapter from Ponkshe,
Singhal et al. 2024, "Initialization using Update Approximation is a Silver Bullet
for Extremely Efficient Low-Rank Fine-Tuning" (LoRA-SB), arXiv 2411.19557).

Why: the adapter is ``B @ R @ A`` with B and A frozen and *shared by every client*,
so R lives in one coordinate system for everyone and averaging it is linear:
``B (sum_k p_k s_k R_k) A = sum_k p_k s_k B R_k A``. Unlike FedAvg on (A, B) there is
no cross term, so the aggregate is exactly the ideal update T, and each round costs
r^2 numbers per module and direction, independent of d and of the number of clients.

Heterogeneous ranks: client k builds its adapter from ``B[:, :r_k]`` and
``A[:r_k]`` and trains the top-left ``r_k x r_k`` block of R. The server averages each
entry (i, j) of the folded R over the clients that trained it, i.e. those with
``r_k > max(i, j)``, with their weights p_k renormalised over that set; entries
nobody trained this round keep their previous value. What "exact" means then:
split R into shells ``rho_{l-1} <= max(i, j) < rho_l`` by the distinct client ranks
``rho_0 = 0 < rho_1 < rho_2 < ...``. On shell l the applied update is *exactly* the
mean, with weights p_k renormalised, of the dense updates ``s_k B_k R_k A_k`` of the
clients with ``r_k >= rho_l``, projected onto that shell; for orthonormal bases that
projection is ``Pi(rho_l) - Pi(rho_{l-1})`` with ``Pi(q)(D) = B_q B_q^T D A_q^T A_q``,
``B_q = B[:, :q]``, ``A_q = A[:q]``. Outside every client's block the previous
global adapter is kept. There is no cross-term error anywhere. It is *not* T,
though: T zero-pads, so it would shrink outer shells every round by the weight of
the clients that lack them; renormalising treats "did not train this entry" as
missing rather than as zero.

Exactly when the round's aggregate equals T (``diagnostics.relative_error`` ~0): every
participant of the round has the same rank r, and the global R is zero outside its
top-left r x r block, since entries outside it keep their previous value. That holds
always when r = max_rank; for r < max_rank only with the random init's R = 0 and no
earlier round with a client of rank above r (never with an ``initial=`` R, which is
diag(S) at full size). Otherwise relative_error reports the deliberate difference:
with mixed ranks the renormalised outer shells (0.82 in a 2,4,8 run of the platform),
and with equal ranks below max_rank any kept old entries outside the block.

FedAvg, FedEx-LoRA, HetLoRA and LoRA-FAIR use the same rule on the components of
(B, A) (``linalg.holder_weighted_mean``).

Initialisation (run-constant B, A and the starting R, all per module), the run config's
``sb-init`` choosing the source (``INIT_SOURCES``; the server runs it, ``server.lora_sb_round``):
* ``server-public`` (default): LoRA-SB's own definition (arXiv 2411.19557, Sec. 4): the
  truncated SVD of ``dW = -lr * sign(summed gradient)`` over the coordinator's public
  examples, a calibration part held apart from the evaluation examples
  (``server.calibration``);
* ``federated``: a round 0 in which the sampled nodes send linear sketches of their summed
  gradients (``aggregation.sb_sketch``), clipped and noised on DP nodes; it approximates a
  normalised gradient step, not the sign step (the difference is stated there);
* ``random`` (ablation, not LoRA-SB): seeded B with orthonormal columns, A with orthonormal
  rows, R = 0 (the initial update is zero).
The first two arrive as ``initial=`` precomputed ``{"B", "A", "R"}`` per module, with R
*folded* (the adapter contributes ``B @ R @ A``; ``lora_sb_init`` returns exactly this).

The reference Fed-SB code initialises from clients' data without accounting for it: its DP
script (fed_sb/DP/SNLI/fed_trainer.py) estimates the init gradient on the training set before
the PrivacyEngine is attached, so B and A, sent to every client, are an SVD of non-private
gradients. Here a DP node's federated contribution is clipped, noised and charged to its
privacy ledger (``client.lora_sb``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from aggregation import register
from aggregation.base import (
    check_rank,
    WeightedSum,
    Aggregation,
    ClientInfo,
    ClientUpdate,
    Downlink,
    ModelSpec,
    Recommended,
    Tensors,
)
from aggregation.seeded_init import module_rng
from aggregation.linalg import example_weights
from aggregation.lowrank import random_orthonormal

#: where the LoRA-SB init comes from (``sb-init``); the server maps each to its computation
INIT_SOURCES = ("server-public", "federated", "random")


@dataclass(frozen=True)
class SBState:
    """Per module: frozen ``B`` (d_out x m), frozen ``A`` (m x d_in) and the folded
    ``R`` (m x m, scaling already multiplied in), at the maximum rank m."""

    factors: Tensors
    max_rank: int


def lora_sb_init(approx_update: np.ndarray, rank: int) -> dict[str, np.ndarray]:
    """LoRA-SB's init from the approximate first full fine-tuning step ``dW``.

    ``dW = U S V^T`` (the caller forms ``dW = -lr * sign(summed gradient)``, d_out x
    d_in). Returns ``B = U_r``, ``A = V_r^T``, ``R = diag(S_r)`` so that
    ``B @ R @ A`` is the best rank-r approximation of dW (Eckart-Young). R is folded:
    a client with scaling s loads ``R / s``, so ``s * B (R / s) A = dW_r`` for any
    alpha. The LoRA-SB reference code (utils/initialization_utils.py,
    utils/svd_utils.py) sets exactly B = U_r, A = V_r^T, R = diag(S_r) and fixes
    lora_alpha = r (s = 1), where folded and unfolded R agree; it takes the SVD of
    the transposed gradient, which is the same thing in W's d_out x d_in layout.
    The initial adapter is therefore not zero: the model starts at ``W0 + dW_r``.
    """
    dw = np.asarray(approx_update, dtype=np.float64)
    if dw.ndim != 2:
        raise ValueError(f"approx_update must be a matrix, got shape {dw.shape}")
    if not 1 <= rank <= min(dw.shape):
        raise ValueError(f"rank must be in [1, {min(dw.shape)}] for shape {dw.shape}")
    u, s, vt = np.linalg.svd(dw, full_matrices=False)
    return {"B": u[:, :rank].copy(), "A": vt[:rank].copy(), "R": np.diag(s[:rank])}


def random_sb_init(spec: ModelSpec) -> Tensors:
    """Seeded orthonormal bases and R = 0 for every module."""
    out: Tensors = {}
    for name, shape in sorted(spec.modules.items()):
        if spec.max_rank > min(shape.d_out, shape.d_in):
            # orthonormal bases need room; B @ R @ A beyond min(d) adds nothing anyway
            raise ValueError(
                f"Fed-SB needs max_rank <= min(d_out, d_in); module {name} is "
                f"{shape.d_out} x {shape.d_in} and max_rank is {spec.max_rank}"
            )
        rng_b = module_rng(spec.seed, name, "fed-sb-B")
        rng_a = module_rng(spec.seed, name, "fed-sb-A")
        out[name] = {
            "B": random_orthonormal(rng_b, shape.d_out, spec.max_rank),
            "A": random_orthonormal(rng_a, shape.d_in, spec.max_rank).T,
            "R": np.zeros((spec.max_rank, spec.max_rank)),
        }
    return out


def _checked_initial(
    initial: Mapping[str, Mapping[str, np.ndarray]], spec: ModelSpec
) -> Tensors:
    """Validate a precomputed init against the spec and cut it to max_rank."""
    missing = sorted(set(spec.modules) - set(initial))
    extra = sorted(set(initial) - set(spec.modules))
    if missing or extra:
        raise ValueError(f"Fed-SB initial: missing modules {missing}, unknown modules {extra}")
    m = spec.max_rank
    out: Tensors = {}
    for name, shape in sorted(spec.modules.items()):
        b, a, r = (np.asarray(initial[name][k], dtype=np.float64) for k in ("B", "A", "R"))
        q = r.shape[0]
        if b.shape != (shape.d_out, q) or a.shape != (q, shape.d_in) or r.shape != (q, q):
            raise ValueError(
                f"Fed-SB initial for {name}: B {b.shape}, R {r.shape}, A {a.shape} do not "
                f"fit a {shape.d_out} x {shape.d_in} module"
            )
        if q < m:
            raise ValueError(f"Fed-SB initial for {name} has rank {q} < max_rank {m}")
        # the leading components are the ones every client rank shares
        out[name] = {"B": b[:, :m].copy(), "A": a[:m].copy(), "R": r[:m, :m].copy()}
    return out


def entrywise_mean(
    old_r: np.ndarray, updates: Sequence[ClientUpdate], weights: np.ndarray, module: str
) -> np.ndarray:
    """Folded R averaged per entry over the clients that trained it (see docstring)."""
    m = old_r.shape[0]
    total = np.zeros((m, m))
    mass = np.zeros((m, m))
    for p, update in zip(weights, updates, strict=True):
        r = update.rank
        r_k = np.asarray(update.tensors[module]["R"], dtype=np.float64)
        if r_k.shape != (r, r) or r > m:
            raise ValueError(
                f"node {update.node_id}: R for {module} has shape {r_k.shape}, expected "
                f"({r}, {r}) with rank <= {m}"
            )
        total[:r, :r] += p * update.scale * r_k
        mass[:r, :r] += p
    trained = mass > 0
    out = np.array(old_r, dtype=np.float64, copy=True)
    out[trained] = total[trained] / mass[trained]
    return out


@register("fed-sb")
class FedSB:
    """Average only R; B and A are frozen, shared and sent once per node."""

    uplink = frozenset({"R"})
    adapter_kind = "bra"
    weighted_sum = WeightedSum(coverage={"R": "block"}, renormalised=True)
    accepts_calibration = True
    # R alone trains, so at a rate of its own; the init's sign step stays at LoRA's rate (a step
    # of 1e-2 on every weight entry had taken validation ppl 39.6 -> 636 before any training)
    recommended = Recommended(
        learning_rate=1e-2, init_learning_rate=1e-3,
        source="simulations/tuning.json (python -m simulations.tune, 2026-12-01; grid 3e-3..1e-1 at sb-init-lr 1e-3)",
        paper="Fed-SB (arXiv 2502.15436), its code's commonsense script: lr 1e-4 for Llama-3.2-3B at r=200, alpha=r, "
              "AdamW with 2% linear warmup, init step lr/(0.02 x total steps)")

    def __init__(self, *, initial: dict[str, dict[str, np.ndarray]] | None = None) -> None:
        # own copy, so a caller editing its arrays later cannot change this run
        self._initial = None if initial is None else {
            name: {k: np.array(v, dtype=np.float64) for k, v in f.items()}
            for name, f in initial.items()
        }

    def init_state(self, spec: ModelSpec) -> SBState:
        if self._initial is None:
            factors = random_sb_init(spec)
        else:
            factors = _checked_initial(self._initial, spec)
        return SBState(factors=factors, max_rank=spec.max_rank)

    def downlink(self, state: SBState, client: ClientInfo) -> Downlink:
        r = client.rank
        check_rank(r, state.max_rank, node=client.node_id)
        adapter = {name: {"R": f["R"][:r, :r] / client.scale} for name, f in state.factors.items()}
        frozen = {
            name: {"B": f["B"][:, :r].copy(), "A": f["A"][:r].copy()}
            for name, f in state.factors.items()
        }
        return Downlink(adapter=adapter, trainable=frozenset({"R"}), frozen=frozen)

    def aggregate(self, state: SBState, updates: Sequence[ClientUpdate]) -> Aggregation:
        weights = example_weights(updates)
        factors = {
            name: {"B": f["B"], "A": f["A"], "R": entrywise_mean(f["R"], updates, weights, name)}
            for name, f in state.factors.items()
        }
        return Aggregation(state=SBState(factors=factors, max_rank=state.max_rank))

    def global_delta(self, state: SBState) -> Tensors:
        return {
            name: {"B": f["B"] @ f["R"], "A": f["A"].copy()} for name, f in state.factors.items()
        }

    def client_delta(self, state: SBState, update: ClientUpdate) -> Tensors:
        r = update.rank
        out: Tensors = {}
        for name, f in state.factors.items():
            r_k = update.scale * np.asarray(update.tensors[name]["R"], dtype=np.float64)
            out[name] = {"B": f["B"][:, :r] @ r_k, "A": f["A"][:r].copy()}
        return out

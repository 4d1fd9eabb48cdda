"""LoRA-FAIR: FedAvg factors with a server-side residual on B (Bian, Wang, Zhang and
Xu, "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization
Refinement", ICCV 2025, arXiv 2411.14961).

Why: FedAvg's product B_bar A_bar is not the ideal update T = sum_k p_k s_k B_k A_k
(aggregation bias), and FLoRA's exact fix restarts every client from a fresh adapter,
which throws away the warm start (initialisation lag). LoRA-FAIR keeps the averaged
A_bar and corrects only B: it finds dB with (B_bar + dB) A_bar ~ T and sends clients
(A_bar, B_bar + dB) to start the next round. Nothing is folded into the base weights and
the downlink costs what FedAvg's does.

The limit of a B-only correction: every product X @ A_bar has its rows in the row space
of A_bar, so no dB can remove the part of T outside it. The best any dB can do is

    || T (I - pinv(A_bar) A_bar) ||_F / || T ||_F

which is what ``solver="closed-form"`` reaches (ridge = 0):
dB = (T - B_bar A_bar) pinv(A_bar), the least-squares solution. ``ridge > 0`` solves
(T - B_bar A_bar) A_bar^T (A_bar A_bar^T + ridge I)^-1 instead, trading exactness for a
smaller correction (the paper's concern: a large dB moves the clients' starting point
far from the average they agreed on). We never form the d_out x d_in T: with the thin
SVD A_bar = U S V^T, T V = sum_k p_k s_k B_k (A_k V) costs O(d r_k r) per client.

``solver="paper"`` follows the paper's objective, minimised from dB = 0:

    min_dB  1 - cos(T, (B_bar + dB) A_bar) + lam * ||dB||_F / ||B_bar||_F

The paper writes S(T, (B_bar + dB) A_bar) + lam ||dB|| with S its (cosine) similarity;
as a loss that is 1 - cos. We divide the regulariser by ||B_bar||_F: the cosine has no
units, and our B carries the folded s_k where the paper's does not, so a raw
lam ||dB|| would change meaning with alpha and with the scale of the factors. With
this form the correction stays exactly zero unless it improves the cosine by more than
about lam (relative to ||B_bar||), whatever the units. The authors' code was not
available to us (the paper notes list none and no copy of github.com/jmbian/LoRA-FAIR
could be read here), so this is written from the paper's description. The paper
solves it with SGD; we use accelerated proximal gradient descent (FISTA with restarts)
with the analytic gradient of the cosine term and the exact proximal step (group
soft-threshold) of the norm, which handles its kink at dB = 0 where the iteration
starts. Backtracking and restarts make the objective decrease monotonically; plain
gradient steps needed thousands of iterations when A_bar is badly conditioned (mixed
ranks and uneven weights do that), these need tens to a couple of hundred. ``steps``
caps the iterations and ``lr`` is the first trial step relative to the natural scale
||B_bar A_bar||^2 / ||A_bar||_2^2, so neither depends on the units of the factors.

The cosine is blind to magnitude: its optimum is a ray, and the solver lands wherever
on it the descent path leads. On random test inputs (tests/aggregation/helpers.py) the
solved dB shrank the product to a median 16% of the length of T's projection, and
||(B_bar + dB) A_bar - T||_F ended *above* FedAvg's for about three modules in four,
although the cosine always rose. We therefore apply t * dB with the t in [0, 1] that
minimises that Frobenius error (a quadratic in t): t = 1 is the paper's answer, t = 0
plain FedAvg, so the result is never worse than FedAvg. The t of each module is kept
in the state (``correction_step``).

Heterogeneous ranks (the paper assumes equal ranks): A_bar and B_bar are FedAvg's
per-component means at the maximum rank (``linalg.holder_weighted_mean``, see
``aggregation.fedavg``): each component averaged over the participants that hold it,
the previous global value kept where none does. The correction is computed against
this mean, kept components included: a kept row of A_bar is one more direction dB
may use to fit T, and a kept column of B_bar may be corrected like any other (with a
zero dB, e.g. a large lam, it stays exactly as it was). The downlink is truncated to
each client's rank, so a low-rank client starts from part of the corrected product.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

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
from aggregation.linalg import (
    check_lora_update,
    example_weights,
    fold,
    folded_lora,
    folded_pairs,
    holder_weighted_mean,
    lowrank_fro_norm,
    stack_lowrank,
    truncated_downlink,
)

SOLVERS = ("closed-form", "paper")


@dataclass(frozen=True, kw_only=True)
class FairState:
    """Folded (A_bar, B_bar + dB) at max rank, and what the last correction did."""

    factors: Tensors
    max_rank: int
    #: ||dB||_F per module in the last round (0.0 before the first round)
    correction_norm: dict[str, float] = field(default_factory=dict)
    #: paper solver only: the t in [0, 1] its dB was scaled by (1.0 = kept as solved)
    correction_step: dict[str, float] = field(default_factory=dict)


def _pinv_filter(s: np.ndarray, shape: tuple[int, int], ridge: float) -> np.ndarray:
    """phi(s) with A_bar^+ = V diag(phi) U^T: 1/s (cut at pinv's tolerance) or s/(s^2+ridge)."""
    if ridge > 0.0:
        return s / (s * s + ridge)
    # A rank-deficient A_bar (zero or dependent rows) gives zero singular values up to
    # rounding; treat near-zero ones as zero, with numpy.linalg.pinv's default tolerance.
    cutoff = (s.max(initial=0.0)) * max(shape) * np.finfo(np.float64).eps
    out = np.zeros_like(s)
    keep = s > cutoff
    out[keep] = 1.0 / s[keep]
    return out


def closed_form_correction(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]], mean: dict[str, np.ndarray], ridge: float
) -> np.ndarray:
    """dB = (T - B_bar A_bar) A_bar^+ (ridge: ... A_bar^T (A_bar A_bar^T + ridge I)^-1).

    ``pairs`` (p_k s_k B_k, A_k) is consumed once, so it may be a generator: then only
    one client's folded factors are in memory at a time.
    """
    b_bar, a_bar = mean["B"], mean["A"]
    u, s, vt = np.linalg.svd(a_bar, full_matrices=False)
    phi = _pinv_filter(s, a_bar.shape, ridge)
    v = vt.T
    t_v = sum(b @ (a @ v) for b, a in pairs)  # T V without forming T
    return (t_v * phi) @ u.T - (b_bar @ u) * (s * phi) @ u.T


def iter_folded(
    updates: Sequence[ClientUpdate], weights: np.ndarray, module: str
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(p_k s_k B_k, A_k) one client at a time (``linalg.folded_pairs``, lazily)."""
    for p, update in zip(weights, updates, strict=True):
        yield p * fold(update, "B", module), np.asarray(update.tensors[module]["A"], np.float64)


def frobenius_norm_of_sum(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """||T||_F: dense product when that is cheaper than QR of the stacked factors."""
    d_out, d_in = pairs[0][0].shape[0], pairs[0][1].shape[1]
    stacked_rank = sum(a.shape[0] for _, a in pairs)
    if 2 * stacked_rank * (d_out + d_in) > d_out * d_in:
        return float(np.linalg.norm(sum(b @ a for b, a in pairs)))
    return lowrank_fro_norm(stack_lowrank(pairs))


def cross_terms(
    pairs: list[tuple[np.ndarray, np.ndarray]], a_bar: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """C = T A_bar^T (d_out x r) and G = A_bar A_bar^T (r x r), without forming T.

    For M = B' A_bar: <M, T> = <B', C> and ||M||_F^2 = <B'^T B', G>.
    """
    c = sum(b @ (a @ a_bar.T) for b, a in pairs)
    return np.asarray(c), a_bar @ a_bar.T


def paper_correction(
    mean: dict[str, np.ndarray],
    c: np.ndarray,
    gram: np.ndarray,
    t_norm: float,
    *,
    lam: float,
    steps: int,
    lr: float,
) -> np.ndarray:
    """The paper's dB, by accelerated proximal gradient from dB = 0 (module doc).

    The regulariser is lam * ||dB||_F / ||B_bar||_F: the cosine term has no units, so
    measuring dB relative to B_bar keeps lam's meaning independent of alpha and of the
    scale of the factors (our B carries the folded s_k, the paper's does not).
    ``c, gram`` come from ``cross_terms`` and ``t_norm`` is ||T||_F.
    """
    b_bar = mean["B"]
    zero = np.zeros_like(b_bar)
    b_norm = float(np.linalg.norm(b_bar))

    def m_norm(bp: np.ndarray) -> float:
        return float(np.sqrt(max(np.sum((bp.T @ bp) * gram), 0.0)))

    def loss(bp: np.ndarray) -> float:  # 1 - cos(T, B' A_bar)
        return 1.0 - float(np.sum(bp * c)) / (m_norm(bp) * t_norm)

    def grad(bp: np.ndarray) -> np.ndarray:  # d(1 - cos)/d dB, chained through A_bar
        mn = m_norm(bp)
        cos = float(np.sum(bp * c)) / (mn * t_norm)
        return -(c / (mn * t_norm) - cos * (bp @ gram) / mn**2)

    def prox(x: np.ndarray, step: float) -> np.ndarray:  # of step * lam/|B_bar| * ||.||_F
        norm = float(np.linalg.norm(x))
        return x * max(0.0, 1.0 - step * lam / (b_norm * norm)) if norm > 0.0 else x

    m0 = m_norm(b_bar)
    if t_norm == 0.0 or m0 == 0.0:
        # The cosine is undefined for a zero product; leave FedAvg's factors alone.
        return zero

    def objective(x: np.ndarray) -> float:
        return loss(b_bar + x) + lam * float(np.linalg.norm(x)) / b_norm

    # Accelerated proximal gradient (FISTA) with backtracking and function-value
    # restart (O'Donoghue & Candes 2015): mixed ranks and uneven client weights make
    # A_bar A_bar^T badly conditioned, where plain gradient steps crawl. A restart drops
    # the momentum and takes a plain proximal step, which cannot increase the
    # objective, so the iterates only ever improve on dB = 0.
    step = lr * m0**2 / float(np.linalg.eigvalsh(gram)[-1])
    delta, anchor, momentum = zero, zero, 1.0
    value = objective(zero)
    for _ in range(steps):
        if m_norm(b_bar + anchor) == 0.0:
            anchor, momentum = delta, 1.0
        g = grad(b_bar + anchor)
        f_anchor = loss(b_bar + anchor)
        step *= 1.25  # let the step grow back after earlier backtracking
        while True:
            trial = prox(anchor - step * g, step)
            d = trial - anchor
            # majorisation test of proximal gradient with backtracking (Beck & Teboulle)
            bound = f_anchor + float(np.sum(g * d)) + float(np.sum(d * d)) / (2.0 * step)
            if m_norm(b_bar + trial) > 0.0 and loss(b_bar + trial) <= bound + 1e-15:
                break
            step *= 0.5
            if step < 1e-30 * m0**2:  # no decrease possible: stationary to precision
                trial = anchor
                break
        trial_value = objective(trial)
        if trial_value > value:
            if anchor is delta:  # a plain step from the iterate failed: converged
                break
            anchor, momentum = delta, 1.0  # restart
            continue
        moved = float(np.linalg.norm(trial - delta))
        next_momentum = (1.0 + np.sqrt(1.0 + 4.0 * momentum**2)) / 2.0
        anchor = trial + ((momentum - 1.0) / next_momentum) * (trial - delta)
        delta, value, momentum = trial, trial_value, next_momentum
        if moved <= 1e-12 * float(np.linalg.norm(b_bar + delta)):
            break
    return delta


def frobenius_step(
    mean: dict[str, np.ndarray], delta: np.ndarray, c: np.ndarray, gram: np.ndarray
) -> float:
    """The t in [0, 1] minimising ||(B_bar + t dB) A_bar - T||_F (a quadratic in t).

    t = 1 keeps the paper's correction; t = 0 is plain FedAvg. The cosine objective
    fixes the direction of the product but not its length, so its dB can overshoot or
    shrink the product; scaling it back never ends worse than FedAvg.
    """
    curvature = float(np.sum((delta.T @ delta) * gram))  # ||dB A_bar||^2
    if curvature <= 0.0:
        return 0.0
    slope = float(np.sum((mean["B"].T @ delta) * gram)) - float(np.sum(delta * c))
    return float(np.clip(-slope / curvature, 0.0, 1.0))


@register("lora-fair")
@dataclass(frozen=True, kw_only=True)
class LoraFair:
    """FedAvg factors, B corrected towards T on the server; no base-weight update."""

    uplink: ClassVar[frozenset[str]] = frozenset({"A", "B"})
    adapter_kind: ClassVar[str] = "lora"
    weighted_sum: ClassVar[WeightedSum | str] = "its correction solves a least-squares problem over the client factors (nonlinear)"
    accepts_calibration: ClassVar[bool] = False
    recommended = Recommended(
        learning_rate=0.01, source="simulations/tuning.json (python -m simulations.tune, 2026-12-01; "
                                    "grid 0.0015..0.025)",
        paper="LoRA-FAIR (arXiv 2411.14961): its rate not checked offline")

    solver: str = "closed-form"
    ridge: float = 0.0
    lam: float = 0.01
    steps: int = 200
    lr: float = 1.0

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(
                f"unknown LoRA-FAIR solver {self.solver!r}; valid solvers are: "
                + ", ".join(repr(s) for s in SOLVERS)
            )
        if not (np.isfinite(self.ridge) and self.ridge >= 0.0):
            raise ValueError(f"ridge must be a finite number >= 0, got {self.ridge}")
        if self.solver == "paper" and self.ridge != 0.0:
            # refuse rather than silently ignore an option that would have no effect
            raise ValueError("ridge applies to solver='closed-form'; the paper solver uses lam")
        if not (np.isfinite(self.lam) and self.lam >= 0.0):
            raise ValueError(f"lam must be a finite number >= 0, got {self.lam}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not (np.isfinite(self.lr) and self.lr > 0.0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")

    def init_state(self, spec: ModelSpec) -> FairState:
        return FairState(factors=lora_init(spec), max_rank=spec.max_rank)

    def downlink(self, state: FairState, client: ClientInfo) -> Downlink:
        return truncated_downlink(state.factors, client, state.max_rank)

    def aggregate(self, state: FairState, updates: Sequence[ClientUpdate]) -> Aggregation:
        shapes = {n: (f["B"].shape[0], f["A"].shape[1]) for n, f in state.factors.items()}
        for update in updates:
            check_lora_update(update, shapes)
        weights = example_weights(updates)
        factors: Tensors = {}
        norms: dict[str, float] = {}
        steps: dict[str, float] = {}
        for name, previous in state.factors.items():
            # every step below (both solvers, the step t) works on this mean
            mean = holder_weighted_mean(previous, updates, weights, name)
            if self.solver == "closed-form":
                delta = closed_form_correction(
                    iter_folded(updates, weights, name), mean, self.ridge
                )
            else:
                pairs = folded_pairs(updates, weights, name)
                c, gram = cross_terms(pairs, mean["A"])
                t_norm = frobenius_norm_of_sum(pairs)
                solved = paper_correction(
                    mean, c, gram, t_norm, lam=self.lam, steps=self.steps, lr=self.lr
                )
                steps[name] = frobenius_step(mean, solved, c, gram)
                delta = steps[name] * solved
            factors[name] = {"A": mean["A"], "B": mean["B"] + delta}
            norms[name] = float(np.linalg.norm(delta))
        new_state = FairState(
            factors=factors,
            max_rank=state.max_rank,
            correction_norm=norms,
            correction_step=steps,
        )
        return Aggregation(state=new_state)

    def global_delta(self, state: FairState) -> Tensors:
        return {name: dict(f) for name, f in state.factors.items()}

    def client_delta(self, state: FairState, update: ClientUpdate) -> Tensors:
        return folded_lora(update)

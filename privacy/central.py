"""Central (user-level) DP: clip each client's update, add Gaussian noise to the sum.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models"): each client clips its whole round update to L2 norm ``C`` (on the client,
``clip_update``; the server re-clips, so a client that skips it gains nothing), and
the server adds Gaussian noise calibrated to ``C`` and the clients' weights. The unit
of privacy is a client's entire data set, not one example.

It only works where the aggregate is a weighted *sum* of the uploads, the methods whose
classes declare ``WeightedSum`` (``aggregation.weighted_sum_names()``): fedavg (A and B
averaged), ffa-lora (B averaged, A frozen), fed-sb (R averaged, A and B frozen),
fedsa-lora (A averaged, B never leaves the node) and fedsvd (its state is the weighted
mean; the SVD that re-orthonormalises A is post-processing of the noised sum).
``CentralDP`` wraps such an ``Aggregator`` and implements the same protocol, the way
Flower's DP strategy wrappers wrap a strategy. Methods whose aggregate is not a sum
are refused (``check_central_dp``): FLoRA's aggregate is a concatenation of the
clients' factors, so each client's factors appear verbatim in the release, and the
SVD-, norm- or residual-based methods are nonlinear in the uploads.

Calibration. The sum is taken over *scale-folded* factors (``s`` multiplied into B
or R, aggregation.base), so clients clip the folded update
``(s ΔB, ΔA)`` / ``s ΔR`` / ``s ΔB`` against what they were sent. Each coordinate c
of the aggregate is ``Σ_k w_{k,c} x_{k,c}`` with one weight ``w_c`` shared by every
client that has that coordinate (FFA-LoRA: the client's weight ``p_k``; FedAvg and
Fed-SB renormalise each component / entry over the clients that hold it, so with mixed
ranks a coordinate only some clients hold weighs each of them more).
Adding noise of standard deviation ``z · C · w_c`` per coordinate makes the
Mahalanobis sensitivity of one client's contribution at most ``1 / z``: exactly the
Gaussian mechanism with noise multiplier ``z``. With equal ranks and uniform
weights that is Flower's ``z · C / m`` on every coordinate. Coordinates no client
trained get no noise (they release nothing new). Frozen factors are never noised.

Weights: ``weighting="uniform"`` (default) gives every client the same weight 1/m,
the standard user-level analysis; example-count weights would make one client's
data set size move every other client's weight. ``weighting="examples"`` keeps the
inner aggregator's example weights and calibrates to the largest one, treating the
reported counts as public (they are sent in the clear).

Why not Flower's ``DifferentialPrivacyServerSideFixedClipping`` /
``DifferentialPrivacyClientSideFixedClipping`` (flwr/serverapp/strategy/
dp_fixed_clipping.py): they wrap a *Strategy* whose every client receives one and the
same full-size ``ArrayRecord``; they clip each reply's ArrayRecord against that
record (``compute_clip_model_update``) and add ``z · C / m`` noise to every array of
the aggregated record. Our strategy sends each client its *own* downlink (truncated to
its rank and un-folded by its own scale), clients upload only part of the adapter
(R only, B only, rank-specific A/B), those uploads must be scale-folded before they
are comparable, frozen factors must not be noised, Fed-SB's renormalised mean needs a
per-coordinate noise level, and the global state lives in the aggregator, not in an
ArrayRecord the strategy passes around (ours is empty). So the clipping reference,
the norm and the noise all have to be computed in aggregator terms, here.

This module imports numpy and the project's pure-numpy aggregation protocol only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

import aggregation
from aggregation.base import (
    Aggregation, Aggregator, ClientInfo, ClientUpdate, Downlink, ModelSpec, Tensors, WeightedSum,
)

#: factors the server multiplies by the client's scale s before summing (aggregation.base)
FOLDED = frozenset({"B", "R"})


def _rows(shape: tuple[int, int], rank: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[:rank, :] = True
    return mask


def _cols(shape: tuple[int, int], rank: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[:, :rank] = True
    return mask


def _block(shape: tuple[int, int], rank: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[:rank, :rank] = True
    return mask


#: ``WeightedSum.coverage`` names -> the mask of entries a rank-r upload fills
MASKS: dict[str, Callable[[tuple[int, int], int], np.ndarray]] = {"rows": _rows, "cols": _cols, "block": _block}


def weighted_sum(aggregator: str) -> WeightedSum:
    """The method's weighted-sum layout (a capability its class declares), or a refusal naming why not."""
    declared = aggregation.get_class(aggregator).weighted_sum
    if isinstance(declared, WeightedSum):
        return declared
    raise ValueError(
        f"central DP (dp-central-clip) is not available for aggregator {aggregator!r}: {declared}. "
        f"It works with {', '.join(aggregation.weighted_sum_names())}."
    )


def check_central_dp(aggregator: str) -> None:
    weighted_sum(aggregator)


def folded_delta_norm(uploaded: Tensors, sent: Tensors, *, scale: float) -> float:
    """L2 norm of the scale-folded update over every module and uploaded factor."""
    total = 0.0
    for name, factors in uploaded.items():
        for key, value in factors.items():
            if name not in sent or key not in sent[name]:
                raise ValueError(f"central DP: no downlinked {name}.{key} to measure the update against")
            diff = np.asarray(value, np.float64) - np.asarray(sent[name][key], np.float64)
            if key in FOLDED:
                diff = scale * diff
            total += float(np.sum(diff * diff))
    return math.sqrt(total)


def clip_update(uploaded: Tensors, sent: Tensors, *, scale: float, bound: float) -> Tensors:
    """``sent + min(1, bound / ‖folded Δ‖) · Δ`` per factor; new arrays, inputs untouched.

    Arrays keep their dtype. An update already within the bound is returned as copies
    of the uploaded arrays (bit-identical, not recomputed as sent + Δ).
    """
    if not bound > 0:
        raise ValueError(f"central DP clip must be > 0, got {bound}")
    norm = folded_delta_norm(uploaded, sent, scale=scale)
    factor = bound / norm if norm > bound else 1.0
    out: Tensors = {}
    for name, factors in uploaded.items():
        out[name] = {}
        for key, value in factors.items():
            array = np.asarray(value)
            if factor == 1.0:
                out[name][key] = array.copy()
            else:
                base = np.asarray(sent[name][key], np.float64)
                clipped = base + factor * (np.asarray(array, np.float64) - base)
                out[name][key] = clipped.astype(array.dtype)
    return out


def _uniform(updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
    # the inner aggregator weighs by num_examples; equal counts make its weights 1/m
    return [dataclasses.replace(u, num_examples=1) for u in updates]


def _as_reported(updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
    return list(updates)


#: weighting name -> the updates the inner aggregator is given
WEIGHTINGS: dict[str, Callable[[Sequence[ClientUpdate]], list[ClientUpdate]]] = {
    "uniform": _uniform,
    "examples": _as_reported,
}


class CentralDP:
    """An ``Aggregator`` that adds central DP to a sum-type inner aggregator."""

    def __init__(
        self,
        *,
        inner: Aggregator,
        clip: float,
        noise_multiplier: float,
        weighting: str = "uniform",
        seed: int | None = None,
    ) -> None:
        name = str(getattr(inner, "name", type(inner).__name__))
        check_central_dp(name)
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"central DP clip must be a finite number > 0, got {clip}")
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(f"central DP noise multiplier must be a finite number >= 0, got {noise_multiplier}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown central DP weighting {weighting!r}; valid: {', '.join(sorted(WEIGHTINGS))}")
        self.inner = inner
        self.name = name  # checkpoints and logs know the method by the inner name
        self.layout = weighted_sum(name)
        self.clip = clip
        self.noise_multiplier = noise_multiplier
        self.weighting = weighting
        self.uplink = inner.uplink
        self.adapter_kind = inner.adapter_kind
        self.weighted_sum = inner.weighted_sum  # still a weighted sum: the noise is added to it
        self.accepts_calibration = inner.accepts_calibration
        # None: OS entropy. A seed from the run config would let clients, who know it,
        # regenerate the noise and subtract it.
        self._rng = np.random.default_rng(seed)
        self.last_noise_std: float = 0.0  # largest per-coordinate std of the last round

    def init_state(self, spec: ModelSpec) -> Any:
        return self.inner.init_state(spec)

    def downlink(self, state: Any, client: ClientInfo) -> Downlink:
        return self.inner.downlink(state, client)

    def global_delta(self, state: Any) -> Tensors:
        return self.inner.global_delta(state)

    def client_delta(self, state: Any, update: ClientUpdate) -> Tensors:
        return self.inner.client_delta(state, update)

    def aggregate(self, state: Any, updates: Sequence[ClientUpdate]) -> Aggregation:
        if not updates:
            raise ValueError("cannot aggregate an empty list of client updates")
        clipped = [self._clipped(state, u) for u in updates]
        weighted = WEIGHTINGS[self.weighting](clipped)
        result = self.inner.aggregate(state, weighted)
        if self.noise_multiplier == 0:
            self.last_noise_std = 0.0
            return result
        return Aggregation(state=self._noised(result.state, weighted), base_update=result.base_update)

    def _clipped(self, state: Any, update: ClientUpdate) -> ClientUpdate:
        """Re-clip on the server against the exact downlink this client was sent."""
        sent = self.inner.downlink(state, update.info).adapter
        tensors = clip_update(update.tensors, sent, scale=update.scale, bound=self.clip)
        return dataclasses.replace(update, tensors=tensors)

    def _noised(self, state: Any, updates: Sequence[ClientUpdate]) -> Any:
        counts = np.array([u.num_examples for u in updates], dtype=np.float64)
        weights = counts / counts.sum()
        factors = getattr(state, "factors", None)
        if not isinstance(factors, Mapping) or not dataclasses.is_dataclass(state):
            raise TypeError(f"central DP needs a dataclass state with 'factors', got {type(state).__name__}")
        noised: dict[str, dict[str, np.ndarray]] = {}
        largest = 0.0
        for name, module in factors.items():
            noised[name] = dict(module)
            for key, coverage in self.layout.coverage.items():
                cover = MASKS[coverage]
                value = np.asarray(module[key], np.float64)
                std = self.noise_multiplier * self.clip * self._coordinate_weights(cover, value.shape, updates, weights)
                largest = max(largest, float(std.max(initial=0.0)))
                noised[name][key] = value + std * self._rng.standard_normal(value.shape)
        self.last_noise_std = largest
        return dataclasses.replace(state, factors=noised)

    def _coordinate_weights(
        self, cover: Callable[[tuple[int, int], int], np.ndarray], shape: tuple[int, int],
        updates: Sequence[ClientUpdate], weights: np.ndarray,
    ) -> np.ndarray:
        """Per coordinate: the largest weight any one client has there (0 where none)."""
        largest = np.zeros(shape)
        mass = np.zeros(shape)
        for p, update in zip(weights, updates, strict=True):
            mask = cover(shape, update.rank)
            largest = np.where(mask, np.maximum(largest, p), largest)
            mass += p * mask
        if self.layout.renormalised:
            return np.divide(largest, mass, out=np.zeros(shape), where=mass > 0)
        return largest

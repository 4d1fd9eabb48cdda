"""A node's part of Fed-SB's federated LoRA-SB init (round 0, Flower action ``query.lora_sb``).

The server asks each sampled node for two linear sketches of its summed gradient
``G_k = sum_i grad_W l_i`` over a few of its own examples, per target module:
``Y_k = G_k Omega`` and ``W_k = Psi G_k``, with test matrices every party draws from the run
seed (``aggregation.sb_sketch``, which also states how the resulting init differs from
LoRA-SB's sign step). The gradient itself never leaves the node.

With DP-SGD on for the node (run or node config), the sketch is one Gaussian-mechanism
release, charged to the node's privacy ledger exactly once:

* each example's contribution (its sketch pair, over all modules) is clipped to
  ``dp-max-grad-norm``, the contributions summed, and every coordinate gets Gaussian noise of
  standard deviation ``sigma * C``: removing or adding one example moves the release by at
  most C, so it is the Gaussian mechanism with noise multiplier sigma; it is accounted as one
  step at sample rate 1 (the examples are a fixed subset, so no amplification is claimed);
* sigma is ``dp-noise-multiplier`` when the node fixes one, else calibrated so that this
  release spends at most ``sb-init-dp-share`` of what is left of the node's ``dp-epsilon``;
* a release that would take the node past its target is refused (reply "declined", nothing
  charged); otherwise the ledger is charged *before* anything is computed (a crash after that
  can only over-count), and the reply carries the ε the ledger holds.

Training rounds then calibrate their own noise on top of this history, so the init's
spending is part of the node's budget like any round's.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message

from aggregation.base import Tensors
from aggregation.sb_sketch import sketch_matrices
from client.messages import status_reply
from core.data import Example
from core.gradients import weight_gradients
from core.model import module_shapes
from core.trainer import device
from core.wire import tensors_to_record
from privacy.accounting import History, calibrate_noise, compose, epsilon, total_steps
from privacy.budget import exhausted_reason
from privacy.ledger import PrivacyLedger, dataset_fingerprint
from privacy.settings import DPSettings, check_node_config, local_dp, parse_run_config

ACTION = "lora_sb"  # the message type is "query.lora_sb"
RELEASE_RATE = 1.0  # the init's sample rate as accounted: a fixed subset, no amplification


@dataclass(frozen=True)
class SketchRequest:
    """What the server asks for (the message's "config" record)."""

    rank: int
    oversample: int
    seed: int
    examples: int
    batch_size: int
    max_len: int

    @classmethod
    def from_record(cls, config: ConfigRecord) -> SketchRequest:
        return cls(rank=int(config["rank"]), oversample=int(config["oversample"]), seed=int(config["sketch-seed"]),
                   examples=int(config["examples"]), batch_size=int(config["batch-size"]),
                   max_len=int(config["max-seq-len"]))


def calibration_examples(examples: Sequence[Example], count: int, *, seed: int) -> list[Example]:
    """The node's ``count`` examples for the init (all if it has fewer), in a seeded order."""
    order = np.random.default_rng(seed).permutation(len(examples))[:count]
    return [examples[i] for i in sorted(order)]


def node_sketches(model: torch.nn.Module, tokenizer, examples: Sequence[Example], request: SketchRequest, *,
                  targets: Sequence[str], clip: float | None) -> Tensors:
    """``{module: {"Y", "W"}}`` summed over ``examples``; with ``clip``, each example's pair clipped first."""
    shapes = module_shapes(model, targets)
    dev = next(model.parameters()).device
    mats = {}
    for name, shape in shapes.items():
        omega, psi = sketch_matrices(request.seed, name, shape, rank=request.rank, oversample=request.oversample)
        mats[name] = (torch.from_numpy(omega).float().to(dev), torch.from_numpy(psi).float().to(dev))
    total = {name: {"Y": torch.zeros(s.d_out, mats[name][0].shape[1], device=dev),
                    "W": torch.zeros(mats[name][1].shape[0], s.d_in, device=dev)} for name, s in shapes.items()}
    step = 1 if clip is not None else request.batch_size  # per example: the unit DP protects
    with weight_gradients(model, tokenizer, targets=targets, max_len=request.max_len) as gradients:
        for start in range(0, len(examples), step):
            grads = gradients(examples[start:start + step])
            part = {name: {"Y": g @ mats[name][0], "W": mats[name][1] @ g} for name, g in grads.items()}
            factor = 1.0
            if clip is not None:
                norm = float(torch.sqrt(sum((v.double() ** 2).sum() for f in part.values() for v in f.values())))
                factor = min(1.0, clip / norm) if norm > 0 else 1.0
            for name, f in part.items():
                for key, value in f.items():
                    total[name][key] += factor * value
    return {name: {k: v.detach().cpu().double().numpy() for k, v in f.items()} for name, f in total.items()}


@dataclass(frozen=True)
class Release:
    """The plan for one DP release of the sketch against the node's ledger."""

    settings: DPSettings
    history_before: History
    noise_multiplier: float
    reason: str = ""  # non-empty: declined

    @property
    def declined(self) -> bool:
        return bool(self.reason)

    @property
    def history_after(self) -> History:
        return compose(self.history_before, self.noise_multiplier, RELEASE_RATE, 1)

    def _epsilon(self, history: History) -> float:
        return epsilon(history, delta=self.settings.delta, accountant=self.settings.accountant)

    def metrics(self) -> dict[str, float]:
        """What the reply carries: ε the ledger holds after this reply, and the release's knobs."""
        held = self.history_before if self.declined else self.history_after
        out = {"dp-epsilon": self._epsilon(held), "dp-epsilon-delta": self._epsilon(held) - self._epsilon(
            self.history_before), "dp-delta": self.settings.delta, "dp-noise-multiplier": self.noise_multiplier,
            "dp-sample-rate": RELEASE_RATE, "dp-max-grad-norm": self.settings.max_grad_norm,
            "dp-steps": total_steps(held) - total_steps(self.history_before), "dp-steps-total": total_steps(held)}
        if self.settings.has_target:
            out["dp-epsilon-target"] = self.settings.epsilon
        return out


def plan_release(settings: DPSettings, history: History, *, share: float) -> Release:
    """sigma for this release (see the module docstring), or the reason it is refused."""
    def eps(h: History) -> float:
        return epsilon(h, delta=settings.delta, accountant=settings.accountant)

    spent = eps(history)
    sigma = settings.noise_multiplier
    if not sigma:
        if spent >= settings.epsilon:
            return Release(settings=settings, history_before=history, noise_multiplier=0.0,
                           reason=exhausted_reason(spent, settings.epsilon))
        try:
            sigma = calibrate_noise(target_epsilon=spent + share * (settings.epsilon - spent), delta=settings.delta,
                                    sample_rate=RELEASE_RATE, steps=1, accountant=settings.accountant, prior=history)
        except ValueError as exc:  # the share left is too small for any noise we would use
            return Release(settings=settings, history_before=history, noise_multiplier=0.0, reason=str(exc))
    projected = eps(compose(history, sigma, RELEASE_RATE, 1))
    if settings.has_target and projected > settings.epsilon:
        return Release(settings=settings, history_before=history, noise_multiplier=sigma,
                       reason=exhausted_reason(projected, settings.epsilon))
    return Release(settings=settings, history_before=history, noise_multiplier=sigma)


def handle(msg: Message, context: Context) -> Message:
    # client.handlers registers this handler, so it is imported here rather than at the top
    from client import handlers as node

    try:
        check_node_config(context.node_config)
    except ValueError as exc:  # as in training: an unreadable dp-* key must never release data
        return status_reply(msg, status="failed", reason=str(exc), metrics={})
    cfg = parse_run_config(context.run_config)
    request = SketchRequest.from_record(msg.content["config"])
    examples = node.local_examples(context, cfg)  # the ledger's dataset: the node's whole data
    try:  # the init never reads federated evaluation's held-out slice, as training never does
        trainable, _ = node.node_split(context, cfg)
    except ValueError as exc:
        return status_reply(msg, status="failed", reason=str(exc), metrics={})
    chosen = calibration_examples(trainable, request.examples,
                                  seed=node.stable_seed(cfg.seed, "lora-sb", node.node_key(context)))
    base = node.cached_base(cfg.model)
    model = copy.deepcopy(base.model).to(device())
    dp = local_dp(context.run_config, context.node_config)
    start = time.perf_counter()
    if dp is None:
        sketches = node_sketches(model, base.tokenizer, chosen, request, targets=cfg.targets, clip=None)
        return _answer(msg, context, sketches, {"num-examples": len(chosen),
                                                "init-seconds": time.perf_counter() - start})
    # the very ledger file the node's training rounds charge (same identity, same dataset)
    ledger = PrivacyLedger(directory=dp.ledger_directory(), node=node._ledger_identity(context),
                           dataset=dataset_fingerprint(examples))
    with ledger.locked():
        state = ledger.load()
        release = plan_release(dp, state.history, share=cfg.sb_init_dp_share)
        if release.declined:
            return status_reply(msg, status="declined", reason=release.reason, metrics=release.metrics())
        ledger.save(state.with_history(release.history_after))  # charged before anything is released
        try:
            sketches = node_sketches(model, base.tokenizer, chosen, request, targets=cfg.targets,
                                     clip=dp.max_grad_norm)
        except Exception as exc:  # noqa: BLE001 - the charge stands; the reply says what the ledger holds
            return status_reply(msg, status="failed", reason=f"{type(exc).__name__}: {exc}",
                                metrics=release.metrics())
    rng = np.random.default_rng(dp.noise_seed)  # None: OS entropy (a seed the server knows would undo the noise)
    std = release.noise_multiplier * dp.max_grad_norm
    noised = {name: {k: v + rng.normal(0.0, std, v.shape) for k, v in f.items()} for name, f in sketches.items()}
    return _answer(msg, context, noised, {"num-examples": len(chosen), "init-seconds": time.perf_counter() - start,
                                          **release.metrics()})


def _answer(msg: Message, context: Context, sketches: Tensors, metrics: dict[str, float]) -> Message:
    from client import handlers as node

    reply = status_reply(msg, status="ok", metrics=metrics)
    reply.content["update"] = tensors_to_record(sketches)
    reply.content["identity"] = ConfigRecord({"node-key": node.node_key(context)})
    return reply

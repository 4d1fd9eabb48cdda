"""Local training and evaluation loops. Knows nothing of Flower.

The loss is per sequence (mean over a sequence's answer tokens, then mean over the
batch) rather than Hugging Face's token-weighted ``labels=`` loss: each example then
contributes independently, which is what per-example DP clipping assumes.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from core.data import IGNORE, Example, collate
from core.model import AdaptedModel


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    learning_rate: float
    max_len: int
    seed: int

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"local steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning rate must be > 0, got {self.learning_rate}")


@dataclass(frozen=True)
class TrainResult:
    mean_loss: float
    first_loss: float
    last_loss: float
    steps: int
    seconds: float


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(dev: torch.device) -> contextlib.AbstractContextManager:
    # bf16 autocast on GPU only; CPU trains in fp32 (bf16 matmuls are slow on most CPUs).
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def token_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy (batch x len-1) and the mask of answer tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    mask = labels != IGNORE
    losses = nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        labels.clamp(min=0).reshape(-1),
        reduction="none",
    ).view_as(labels)
    return losses * mask, mask


def sequence_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each sequence's loss: the mean over its own answer tokens (one value per row)."""
    losses, mask = token_losses(model, batch)
    return losses.sum(1) / mask.sum(1).clamp(min=1)


def sequence_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over each sequence's answer tokens, then over the batch."""
    return sequence_losses(model, batch).mean()


def batches(examples: Sequence[Example], cfg: TrainConfig) -> list[list[Example]]:
    """``cfg.steps`` batches, shuffling epoch by epoch with a seeded generator."""
    if not examples:
        raise ValueError("cannot train on an empty partition")
    rng = np.random.default_rng(cfg.seed)
    order: list[int] = []
    needed = cfg.steps * cfg.batch_size
    while len(order) < needed:
        order.extend(rng.permutation(len(examples)).tolist())
    return [
        [examples[i] for i in order[s * cfg.batch_size : (s + 1) * cfg.batch_size]]
        for s in range(cfg.steps)
    ]


def to_device(batch: dict[str, torch.Tensor], dev: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(dev) for k, v in batch.items()}


class PrivateSession(Protocol):
    """One attached round of private training (see ``PrivacyHook``)."""

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Exactly the round's batches, collated on CPU; a batch may have zero rows."""
        ...

    def step(self, per_sequence: torch.Tensor) -> None:
        """Backward from the batch's per-sequence losses and take the private step."""
        ...

    def empty_step(self) -> None:
        """The step for a batch with no rows (noise only, still accounted)."""
        ...

    def close(self) -> None: ...


class PrivacyHook(Protocol):
    """Takes over sampling, backward and the optimizer step (``privacy.dpsgd.OpacusDPSGD``).

    ``attach`` receives the model already on its device with adapters and the
    optimizer over the trainable factors, and wraps them (e.g. ``make_private``).
    """

    def attach(
        self, *, model: nn.Module, optimizer: torch.optim.Optimizer, examples: Sequence[Example],
        tokenizer: Any, cfg: TrainConfig,
    ) -> PrivateSession: ...


def train(
    adapted: AdaptedModel, examples: Sequence[Example], tokenizer, cfg: TrainConfig,
    *, privacy: PrivacyHook | None = None,
) -> TrainResult:
    """AdamW on the adapter's trainable factors for ``cfg.steps`` steps; private with a hook."""
    dev = device()
    model = adapted.model.to(dev)
    model.train()
    params = adapted.trainable_parameters()
    if not params:
        raise ValueError("the adapter has no trainable factors")
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    if privacy is not None:
        return _train_private(model, optimizer, examples, tokenizer, cfg, privacy, dev)
    losses = []
    answer_tokens = 0
    start = time.perf_counter()
    for chunk in batches(examples, cfg):
        batch = to_device(collate(chunk, tokenizer, cfg.max_len), dev)
        answer_tokens += int((batch["labels"] != IGNORE).sum())
        with autocast(dev):
            loss = sequence_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    if answer_tokens == 0:  # every loss was 0 over nothing: the "update" would be AdamW's noise
        raise ValueError(no_answer_tokens(len(losses) * cfg.batch_size, cfg.max_len, "trained on"))
    return TrainResult(
        mean_loss=float(np.mean(losses)),
        first_loss=losses[0],
        last_loss=losses[-1],
        steps=len(losses),
        seconds=time.perf_counter() - start,
    )


def _train_private(
    model: nn.Module, optimizer: torch.optim.Optimizer, examples: Sequence[Example], tokenizer,
    cfg: TrainConfig, privacy: PrivacyHook, dev: torch.device,
) -> TrainResult:
    """The same per-sequence loss; sampling, backward and step belong to the hook."""
    start = time.perf_counter()
    session = privacy.attach(model=model, optimizer=optimizer, examples=examples, tokenizer=tokenizer, cfg=cfg)
    losses: list[float] = []
    steps = 0
    try:
        for batch in session.batches():
            steps += 1
            if batch["input_ids"].shape[0] == 0:
                # Poisson sampling drew nobody. The model cannot run on zero rows, and
                # skipping would be a step the accountant never sees: noise only.
                session.empty_step()
                continue
            batch = to_device(batch, dev)
            with autocast(dev):
                per_sequence = sequence_losses(model, batch)
            session.step(per_sequence)
            losses.append(float(per_sequence.detach().mean()))
    finally:
        session.close()
        model.eval()
    if steps != cfg.steps:
        raise RuntimeError(f"private training took {steps} steps, planned {cfg.steps}")
    # every batch empty (tiny data, small batches): no loss to report, the update is noise
    nan = float("nan")
    return TrainResult(
        mean_loss=float(np.mean(losses)) if losses else nan,
        first_loss=losses[0] if losses else nan,
        last_loss=losses[-1] if losses else nan,
        steps=steps,
        seconds=time.perf_counter() - start,
    )


@dataclass(frozen=True)
class EvalResult:
    loss: float
    perplexity: float
    tokens: int
    examples: int


@torch.no_grad()
def no_answer_tokens(examples: int, max_len: int, what: str) -> str:
    return (f"no answer token left in the {examples} examples {what} at max-seq-len {max_len}: the prompt with its "
            f"chat template fills every sequence (SmolLM2's template alone is ~30 tokens); raise max-seq-len")


def evaluate(
    model: nn.Module, examples: Sequence[Example], tokenizer, *, max_len: int, batch_size: int = 16
) -> EvalResult:
    """Answer-token loss and perplexity (token-weighted over the whole set)."""
    if not examples:
        raise ValueError("cannot evaluate on an empty set")
    dev = device()
    model = model.to(dev).eval()
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = to_device(collate(examples[i : i + batch_size], tokenizer, max_len), dev)
        with autocast(dev):
            losses, mask = token_losses(model, batch)
        total += float(losses.sum())
        tokens += int(mask.sum())
    if tokens == 0:  # a loss of 0 (perplexity 1.0) over nothing would read as a perfect model
        raise ValueError(no_answer_tokens(len(examples), max_len, "evaluated"))
    loss = total / tokens
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=tokens, examples=len(examples))

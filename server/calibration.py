"""LoRA-SB initialisation for Fed-SB, computed once on the server from public data.

LoRA-SB approximates the first step of full fine-tuning, ``dW ~ -lr * sign(sum of
gradients over a few batches)``, and starts the adapter at its best rank-r
approximation (truncated SVD: B, A from the singular vectors, R from the singular
values). The calibration set is a *server-side, public* dataset named in the run
config; client data is never used (with DP on, that would leak private examples into
the B and A sent to every client).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from aggregation.base import Tensors
from aggregation.fed_sb import lora_sb_init
from core.data import Example, collate
from core.model import target_modules
from core.trainer import TrainConfig, batches, sequence_loss


def lora_sb_calibration(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    targets: Sequence[str],
    rank: int,
    learning_rate: float,
    num_batches: int,
    batch_size: int,
    max_len: int,
    seed: int,
) -> Tensors:
    """{"B", "A", "R"} per target module from ``num_batches`` batches of public data."""
    modules = target_modules(model, targets)
    weights = {name: m.weight for name, m in modules.items()}
    for param in model.parameters():
        param.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    cfg = TrainConfig(steps=num_batches, batch_size=batch_size, learning_rate=learning_rate, max_len=max_len, seed=seed)
    try:
        for chunk in batches(examples, cfg):
            sequence_loss(model, collate(chunk, tokenizer, max_len)).backward()  # gradients sum
        out: Tensors = {}
        for name, w in weights.items():
            grad = w.grad.detach().float()
            if type(modules[name]).__name__ == "Conv1D":
                grad = grad.T
            approx = (-learning_rate * torch.sign(grad)).numpy().astype(np.float64)
            out[name] = lora_sb_init(approx, rank)
        return out
    finally:
        for w in weights.values():
            w.grad = None
            w.requires_grad_(False)

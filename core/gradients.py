"""Gradients of a model's adapted weights, summed over examples: what LoRA-SB's init reads.

LoRA-SB approximates the first step of *full* fine-tuning, so it needs the gradient of the
base weight W of every target module (not of any adapter), summed over the examples: the
sum of each example's own answer-token loss gradient, as the reference code sums per-sample
gradients. The server (``server.calibration``, public data) and a node (``client.lora_sb``,
its own data, one example at a time under DP) both compute it here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from core.data import Example, collate
from core.model import target_modules
from core.trainer import sequence_losses

#: examples -> {module name: summed gradient, d_out x d_in (W's layout), float32}
GradientFn = Callable[[Sequence[Example]], dict[str, torch.Tensor]]


@contextlib.contextmanager
def weight_gradients(model: torch.nn.Module, tokenizer, *, targets: Sequence[str],
                     max_len: int) -> Iterator[GradientFn]:
    """Yield a function giving the summed target-weight gradients of a list of examples.

    Only the target weights require gradients while the block runs; afterwards no parameter
    of ``model`` does and no gradient is left on it (the caller passes a scratch copy).
    """
    modules = target_modules(model, targets)
    weights = {name: m.weight for name, m in modules.items()}
    transposed = {name for name, m in modules.items() if type(m).__name__ == "Conv1D"}  # GPT-2: d_in x d_out
    for param in model.parameters():
        param.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)

    def summed(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("no examples to take a gradient of")
        model.zero_grad(set_to_none=True)
        batch = {k: v.to(next(model.parameters()).device) for k, v in collate(examples, tokenizer, max_len).items()}
        sequence_losses(model, batch).sum().backward()
        out = {}
        for name, w in weights.items():
            grad = w.grad.detach().float()
            out[name] = grad.T if name in transposed else grad
            w.grad = None
        return out

    try:
        yield summed
    finally:
        for w in weights.values():
            w.grad = None
            w.requires_grad_(False)

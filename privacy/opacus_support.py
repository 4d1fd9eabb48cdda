"""What Opacus can train here, and how it computes per-example clipping (the grad-sample modes).

Refused with DP on (``check_dp_compatible``): DoRA (its magnitude vector has no
per-sample gradient in Opacus) and LoRA on embedding layers (PEFT's embedding LoRA
keeps its factors as bare parameters of a layer Opacus has no sampler for).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class DPIncompatibleError(ValueError):
    """The model's trainable layers cannot be trained with per-example DP-SGD."""


# --- what Opacus can train ---------------------------------------------------------------

#: module types whose own trainable parameters get exact per-sample gradients from
#: Opacus's registered samplers: LoRA's A and B (also on GPT-2 Conv1D bases, where PEFT
#: still makes them nn.Linear), Fed-SB's R, and linear heads.
SUPPORTED_OWNERS: tuple[type[nn.Module], ...] = (nn.Linear,)


def check_dp_compatible(model: nn.Module) -> None:
    """Refuse, naming the parameter, anything DP-SGD here cannot train correctly."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for module_name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append((module_name, module))
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise DPIncompatibleError("DP-SGD: the model has no trainable parameters")
    for name, param in trainable:
        if "lora_magnitude_vector" in name:
            raise DPIncompatibleError(
                f"DP-SGD does not support DoRA: {name} is DoRA's magnitude vector, which Opacus cannot "
                "compute per-sample gradients for. Turn DoRA off (use_dora=False) or DP off."
            )
        held_by = owners.get(id(param), [])
        types = {type(module) for _, module in held_by}
        if "lora_embedding" in name or any(issubclass(t, nn.Embedding) for t in types):
            raise DPIncompatibleError(
                f"DP-SGD does not support LoRA on embedding layers: {name} is trainable. Opacus cannot "
                "clip its per-example gradients here; target linear layers only, or turn DP off."
            )
        if len(held_by) > 1:
            raise DPIncompatibleError(
                f"DP-SGD: trainable parameter {name} is shared by {[n for n, _ in held_by]}; tied "
                "weights get wrong per-sample gradients"
            )
        if not types or not all(t in SUPPORTED_OWNERS for t in types):
            raise DPIncompatibleError(
                f"DP-SGD: trainable parameter {name} belongs to a {', '.join(t.__name__ for t in types)}; "
                f"supported are {', '.join(t.__name__ for t in SUPPORTED_OWNERS)} layers "
                "(LoRA A/B, Fed-SB's R, linear heads)"
            )


# --- grad-sample modes -----------------------------------------------------------------------


class PerSequenceCriterion(nn.Module):
    """Ghost clipping's criterion: it needs the per-example losses (``reduction='none'``)."""

    def __init__(self) -> None:
        super().__init__()
        self.reduction = "mean"

    def forward(self, per_sequence: torch.Tensor) -> torch.Tensor:
        return per_sequence if self.reduction == "none" else per_sequence.mean()


class PerSampleGradients:
    """Opacus materialises each example's gradient (hooks or functorch), then clips."""

    ghost = False

    def __init__(self, opacus_mode: str) -> None:
        self.opacus_mode = opacus_mode

    def backward(self, per_sequence: torch.Tensor, criterion: Any) -> None:
        # mean over the *actual* rows: Opacus's hooks scale back by that count, so each
        # per-sample gradient is exactly that sequence's gradient
        per_sequence.mean().backward()

    def prepare_noise_only(self, optimizer: Any) -> None:
        for param in optimizer.params:
            param.grad_sample = torch.zeros((0, *param.shape), device=param.device, dtype=param.dtype)


class GhostClipping:
    """Per-example gradient *norms* only (two backward passes), no per-example gradients."""

    ghost = True
    opacus_mode = "ghost"

    def backward(self, per_sequence: torch.Tensor, criterion: Any) -> None:
        criterion(per_sequence).backward()  # Opacus's loss wrapper runs both passes

    def prepare_noise_only(self, optimizer: Any) -> None:
        for param in optimizer.params:
            param.grad = torch.zeros_like(param)  # the clipped sum of no examples


#: ``dp-grad-sample-mode`` -> how per-example clipping is computed. Opacus's "ew"
#: (ExpandedWeights) mode needs ``wrap_model=True`` and a positional input, which a
#: transformers model called by keyword does not give it; simulations/bench_dp.py
#: measures it separately.
GRAD_SAMPLE_MODES: dict[str, PerSampleGradients | GhostClipping] = {
    "hooks": PerSampleGradients("hooks"),
    "functorch": PerSampleGradients("functorch"),
    "ghost": GhostClipping(),
}


def check_grad_sample_mode(name: str) -> None:
    if name not in GRAD_SAMPLE_MODES:
        raise ValueError(f"unknown dp-grad-sample-mode {name!r}; valid: {', '.join(sorted(GRAD_SAMPLE_MODES))}")

"""Adapters on a transformers model: PEFT LoRA (B @ A) or Fed-SB's B @ R @ A.

Module names are the *base model's* names (``model.layers.0.self_attn.q_proj``), the
same on server and clients, whatever wrapper (PEFT or ours) sits on top.

Order of operations matters and is fixed here: load base -> fold base updates into the
base weights (in round order) -> move to device -> wrap with adapters -> load factors.
Folding every logged update in the same order, in float32, makes a client that missed
rounds end with bitwise the same base weights as one that merged every round.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from aggregation.base import ModuleShape, Tensors


def target_modules(model: nn.Module, suffixes: Iterable[str]) -> dict[str, nn.Module]:
    """Base-model Linear/Conv1D modules whose last name component is in ``suffixes``."""
    wanted = set(suffixes)
    found = {
        name: module
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in wanted and _weight_shape(module) is not None
    }
    if not found:
        raise ValueError(
            f"no target modules {sorted(wanted)} in {type(model).__name__}; "
            f"linear layers are named like {_linear_suffixes(model)}"
        )
    return found


def module_shapes(model: nn.Module, suffixes: Iterable[str]) -> dict[str, ModuleShape]:
    return {name: _weight_shape(m) for name, m in target_modules(model, suffixes).items()}  # type: ignore[misc]


def _weight_shape(module: nn.Module) -> ModuleShape | None:
    if isinstance(module, nn.Linear):
        return ModuleShape(d_out=module.out_features, d_in=module.in_features)
    if type(module).__name__ == "Conv1D":  # GPT-2 style: weight is (d_in, d_out)
        d_in, d_out = module.weight.shape
        return ModuleShape(d_out=d_out, d_in=d_in)
    return None


def _linear_suffixes(model: nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _weight_shape(m)})


@torch.no_grad()
def fold_into_base(model: nn.Module, updates: Iterable[Tensors]) -> None:
    """W += B @ A for each logged base update, in the given (round) order."""
    modules = dict(model.named_modules())
    for update in updates:
        for name, factors in update.items():
            module = modules[name]
            delta = torch.from_numpy(np.asarray(factors["B"], np.float32)) @ torch.from_numpy(
                np.asarray(factors["A"], np.float32)
            )
            weight = module.weight
            if type(module).__name__ == "Conv1D":
                delta = delta.T
            weight.add_(delta.to(weight.device, weight.dtype))


# --- B @ R @ A adapter (Fed-SB / LoRA-SB) --------------------------------------------------


class BRALinear(nn.Module):
    """y = base(x) + s * B R A x, as three bias-free Linears so Opacus's samplers apply."""

    def __init__(self, base: nn.Module, rank: int, scale: float) -> None:
        super().__init__()
        shape = _weight_shape(base)
        assert shape is not None
        self.base_layer = base
        self.scale = scale
        self.lora_A = nn.Linear(shape.d_in, rank, bias=False)
        self.lora_R = nn.Linear(rank, rank, bias=False)
        self.lora_B = nn.Linear(rank, shape.d_out, bias=False)
        for layer in (self.lora_A, self.lora_R, self.lora_B):
            nn.init.zeros_(layer.weight)
            layer.to(base.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.scale * self.lora_B(self.lora_R(self.lora_A(x)))


# --- wrapping and factor I/O -----------------------------------------------------------------


@dataclass(frozen=True)
class AdapterSpec:
    kind: str  # "lora" or "bra"
    rank: int
    alpha: float
    targets: tuple[str, ...]
    use_dora: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("lora", "bra"):
            raise ValueError(f"unknown adapter kind {self.kind!r}; expected 'lora' or 'bra'")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class AdaptedModel:
    """A model with adapters on its target modules and a name -> factor-parameter map."""

    def __init__(self, model: nn.Module, spec: AdapterSpec) -> None:
        self.spec = spec
        names = sorted(target_modules(model, spec.targets))
        if spec.kind == "lora":
            config = LoraConfig(
                r=spec.rank,
                lora_alpha=spec.alpha,
                target_modules=list(spec.targets),
                lora_dropout=0.0,
                use_dora=spec.use_dora,
            )
            self.model = get_peft_model(model, config)
            wrapped = dict(self.model.base_model.model.named_modules())
            self.factors = {
                name: {
                    "A": wrapped[name].lora_A["default"].weight,
                    "B": wrapped[name].lora_B["default"].weight,
                }
                for name in names
            }
        else:
            for param in model.parameters():
                param.requires_grad_(False)
            self.factors = {}
            for name in names:
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name)
                layer = BRALinear(getattr(parent, child), spec.rank, spec.scale)
                setattr(parent, child, layer)
                self.factors[name] = {
                    "A": layer.lora_A.weight,
                    "R": layer.lora_R.weight,
                    "B": layer.lora_B.weight,
                }
            self.model = model

    @torch.no_grad()
    def load(self, tensors: Tensors) -> None:
        """Copy factor values (raw, unscaled) into the adapter; shapes must match."""
        for name, factors in tensors.items():
            if name not in self.factors:
                raise KeyError(f"payload names module {name!r}, which has no adapter here")
            for key, value in factors.items():
                param = self.factors[name][key]
                array = torch.from_numpy(np.asarray(value, np.float32))
                if tuple(array.shape) != tuple(param.shape):
                    raise ValueError(
                        f"{name}.{key}: payload shape {tuple(array.shape)} does not match "
                        f"the rank-{self.spec.rank} adapter's {tuple(param.shape)}"
                    )
                param.copy_(array.to(param.device, param.dtype))

    def set_trainable(self, trainable: frozenset[str]) -> None:
        for factors in self.factors.values():
            for key, param in factors.items():
                param.requires_grad_(key in trainable)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for f in self.factors.values() for p in f.values() if p.requires_grad]

    def export(self, names: Iterable[str]) -> Tensors:
        """Raw factors as float32 numpy (ArrayRecord rejects bf16)."""
        keys = sorted(names)
        return {
            name: {k: factors[k].detach().float().cpu().numpy().copy() for k in keys}
            for name, factors in self.factors.items()
        }


def apply_global(model: nn.Module, delta: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Fold the global adapter's folded factors (B @ A) into the base weights (eval)."""
    fold_into_base(model, [dict(delta)])  # type: ignore[list-item]

"""Shared pieces for the DP tests: the tiny model with non-trivial adapters, examples."""

from __future__ import annotations

import copy
import functools

import numpy as np
import torch

from core.data import Example, load_examples
from core.model import AdaptedModel, AdapterSpec, module_shapes
from core.presets import BaseModel, load_base

TARGETS = ("q_proj", "v_proj")


@functools.lru_cache(maxsize=1)
def tiny() -> BaseModel:
    return load_base("tiny")


@functools.lru_cache(maxsize=1)
def chatterbot() -> tuple[Example, ...]:
    return tuple(load_examples("chatterbot"))


def examples(n: int, offset: int = 0) -> list[Example]:
    return list(chatterbot()[offset : offset + n])


def adapted(kind: str, *, rank: int = 4, seed: int = 0, use_dora: bool = False,
            targets: tuple[str, ...] = TARGETS) -> AdaptedModel:
    """A fresh adapter whose factors are all non-zero (PEFT's B = 0 would zero A's gradient).

    ``kind`` is "lora" (A and B trained) or "bra" (Fed-SB: A and B frozen, R trained).
    """
    base = tiny()
    out = AdaptedModel(copy.deepcopy(base.model),
                       AdapterSpec(kind=kind, rank=rank, alpha=2.0 * rank, targets=targets, use_dora=use_dora))
    rng = np.random.default_rng(seed)
    shapes = module_shapes(base.model, TARGETS)
    table = {"A": lambda s: (rank, s.d_in), "B": lambda s: (s.d_out, rank), "R": lambda _s: (rank, rank)}
    keys = "AB" if kind == "lora" else "ABR"
    out.load({m: {k: 0.3 * rng.normal(size=table[k](s)).astype(np.float32) for k in keys}
              for m, s in shapes.items()})
    out.set_trainable(frozenset("AB" if kind == "lora" else "R"))
    return out


def trainable_vector(adapter: AdaptedModel) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in adapter.trainable_parameters()])

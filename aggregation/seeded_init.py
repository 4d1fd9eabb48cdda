"""Seeded initialisation of global adapters, shared by the aggregators.

All clients must start round 1 from the same adapter, or averaging factors mixes
unrelated random bases; so the server draws the initial A once from the run seed.
"""

from __future__ import annotations

import hashlib

import numpy as np

from aggregation.base import ModelSpec, Tensors


def module_rng(seed: int, module: str, purpose: str) -> np.random.Generator:
    """An RNG that depends only on (seed, module, purpose): stable across processes."""
    digest = hashlib.sha256(f"{seed}:{module}:{purpose}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def kaiming_a(rng: np.random.Generator, rank: int, d_in: int) -> np.ndarray:
    """PEFT's default LoRA A init: kaiming-uniform with a=sqrt(5), bound 1/sqrt(d_in)."""
    bound = 1.0 / np.sqrt(d_in)
    return rng.uniform(-bound, bound, size=(rank, d_in))


def lora_init(spec: ModelSpec, *, purpose: str = "lora-init") -> Tensors:
    """Folded factors at max rank: random A, zero B (so the initial update is zero)."""
    out: Tensors = {}
    for name, shape in sorted(spec.modules.items()):
        rng = module_rng(spec.seed, name, purpose)
        out[name] = {
            "A": kaiming_a(rng, spec.max_rank, shape.d_in),
            "B": np.zeros((shape.d_out, spec.max_rank)),
        }
    return out

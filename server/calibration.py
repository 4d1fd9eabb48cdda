"""Fed-SB's ``server-public`` LoRA-SB init: the coordinator's own public examples, apart from evaluation.

LoRA-SB (Ponkshe, Singhal et al. 2024, arXiv 2411.19557, Sec. 4) approximates the first step
of full fine-tuning, ``dW ~ -lr * sign(sum of gradients over a few batches)`` (the sign is
Adam's first update), and starts the adapter at its best rank-r approximation: B and A from
the singular vectors of the truncated SVD, R from the singular values. The examples are the
server's, never a client's:

* by default the *held-out* part of the run's ``data`` (the part no client trains on), split
  deterministically: its last ``calibration-batches x batch-size`` examples (in the held-out
  split's seeded order) are the calibration part, and the server's evaluation reads only the
  rest, so the init never sees an evaluation example;
* with ``calibration-data``, that public file (in a seeded order, its first examples); any
  example of it that is also in the held-out part is dropped from the evaluation part.

``PublicSplit`` holds both parts; their ids (``example_id``, a content hash) go into the run's
record (``initialisations``), where disjointness can be checked.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

import aggregation
from aggregation.base import Tensors
from aggregation.fed_sb import lora_sb_init
from core.config import RunConfig
from core.data import Example, load_examples, split_heldout
from core.gradients import weight_gradients
from server.threads import server_math


def example_id(example: Example) -> str:
    """A short content hash: the same example has the same id in every process and run."""
    return hashlib.sha256(f"{example.prompt}\x1f{example.response}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PublicSplit:
    """The server's examples: what the LoRA-SB init reads and what the evaluation reads."""

    calibration: tuple[Example, ...]
    evaluation: tuple[Example, ...]  # the evaluator takes its first eval-examples
    source: str  # where the calibration part comes from ("" without one)

    def ids(self, examples: Sequence[Example]) -> list[str]:
        return [example_id(e) for e in examples]


def uses_server_public(cfg: RunConfig) -> bool:
    return aggregation.get_class(cfg.aggregator).accepts_calibration and cfg.sb_init == "server-public"


def public_split(cfg: RunConfig) -> PublicSplit:
    """The calibration part (empty unless the run's init is server-public) and the evaluation part."""
    _, heldout = split_heldout(load_examples(cfg.data), cfg.eval_fraction, cfg.seed)
    if not uses_server_public(cfg):
        return PublicSplit(calibration=(), evaluation=tuple(heldout), source="")
    wanted = cfg.calibration_batches * cfg.batch_size
    if cfg.calibration_data:
        pool = sorted(load_examples(cfg.calibration_data), key=lambda e: hashlib.sha256(
            f"{cfg.seed}|{example_id(e)}".encode()).digest())
        calibration, source = tuple(pool[:wanted]), cfg.calibration_data
    else:
        if cfg.eval_examples > 0 and len(heldout) <= wanted:
            raise ValueError(
                f"sb-init=server-public: the held-out part of {cfg.data!r} has {len(heldout)} examples, and the "
                f"calibration part takes {wanted} (calibration-batches {cfg.calibration_batches} x batch-size "
                f"{cfg.batch_size}) before the evaluation gets any; lower them, raise eval-fraction, or give "
                "calibration-data")
        calibration, source = tuple(heldout[-wanted:]), f"held-out part of {cfg.data}"
    seen = {example_id(e) for e in calibration}
    return PublicSplit(calibration=calibration, evaluation=tuple(e for e in heldout if example_id(e) not in seen),
                       source=source)


def lora_sb_calibration(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    targets: Sequence[str],
    rank: int,
    learning_rate: float,
    batch_size: int,
    max_len: int,
    threads: int = 0,
) -> Tensors:
    """{"B", "A", "R"} per target module from every example, in batches of ``batch_size``.

    ``model`` is a scratch copy: its target weights get gradients while this runs. The SVDs
    run with the BLAS/OpenMP pools limited to ``threads`` (0: no limit).
    """
    if not examples:
        raise ValueError("LoRA-SB calibration needs at least one example")
    total: dict[str, torch.Tensor] = {}
    with weight_gradients(model, tokenizer, targets=targets, max_len=max_len) as gradients:
        for start in range(0, len(examples), batch_size):
            for name, grad in gradients(examples[start:start + batch_size]).items():
                total[name] = grad if name not in total else total[name] + grad
    with server_math(threads):
        return {name: lora_sb_init((-learning_rate * torch.sign(g)).cpu().numpy().astype(np.float64), rank)
                for name, g in sorted(total.items())}


def server_public_init(cfg: RunConfig, base, split: PublicSplit) -> Tensors:
    """The run's LoRA-SB init from the calibration part of ``split``."""
    return lora_sb_calibration(
        copy.deepcopy(base.model), base.tokenizer, split.calibration, targets=cfg.targets, rank=cfg.max_rank,
        learning_rate=cfg.sb_init_lr, batch_size=cfg.batch_size, max_len=cfg.max_seq_len,
        threads=cfg.server_threads,
    )

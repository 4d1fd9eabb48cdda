"""Server-side evaluation of the global adapter on the held-out split.

The server keeps its own copy of the base model. Base updates from the strategy's log
are folded in once each, in round order (the same float32 operations as on every
client); the global adapter is then folded in for the evaluation and removed again
by restoring the saved weights, so nothing accumulates rounding across rounds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from aggregation.base import Tensors
from core.data import Example
from core.model import fold_into_base
from core.trainer import EvalResult, evaluate


@dataclass(frozen=True)
class TimedEval:
    result: EvalResult
    seconds: float


class ServerEvaluator:
    def __init__(self, *, model: torch.nn.Module, tokenizer, examples: Sequence[Example], max_len: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.examples = list(examples)
        self.max_len = max_len
        self._folded_rounds: set[int] = set()

    def __call__(self, merge_log: Sequence[tuple[int, Tensors]], global_delta: Tensors) -> TimedEval:
        start = time.perf_counter()
        pending = [(r, t) for r, t in merge_log if r not in self._folded_rounds]
        fold_into_base(self.model, [t for _, t in pending])
        self._folded_rounds.update(r for r, _ in pending)
        modules = dict(self.model.named_modules())
        saved = {name: modules[name].weight.detach().clone() for name in global_delta}
        try:
            fold_into_base(self.model, [global_delta])
            result = evaluate(self.model, self.examples, self.tokenizer, max_len=self.max_len)
        finally:
            with torch.no_grad():
                for name, weight in saved.items():
                    modules[name].weight.copy_(weight)
        return TimedEval(result=result, seconds=time.perf_counter() - start)

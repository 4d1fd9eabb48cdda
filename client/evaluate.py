"""Federated evaluation on the node: the round's global model on the node's own held-out slice.

The server sends the global adapter as folded factors (``Aggregator.global_delta``: FLoRA's
and FedEx-LoRA's base updates travel separately, as for training, and Fed-SB's is B·R·A)
and any base updates the node lacks; the node folds both into a copy of its base model and
scores its held-out slice (``client.node.node_split``: never an example it trains on).
The reply carries loss, perplexity, token and example counts and seconds: with DP-SGD on
it is a release computed on private data (see the README's "Federated evaluation").
"""

from __future__ import annotations

import copy
import os
import time

from flwr.app import Context, Message

from client.messages import status_reply
from client.node import BASE_LOADS, cached_base, known_merges, node_split
from core.model import fold_into_base
from core.trainer import evaluate
from core.wire import record_to_tensors
from privacy.settings import parse_run_config

ACTION = "evaluate"


def handle(msg: Message, context: Context) -> Message:
    cfg = parse_run_config(context.run_config)
    settings = msg.content["config"]
    held = known_merges(msg, context)
    needed = [r for r in settings["merge-rounds"] if r > 0]
    lacking = [r for r in needed if r not in held]
    if lacking:  # the server resends them with the next message
        merged = max([r for r in held if all(q in held for q in needed if q <= r)] or [0])
        return status_reply(msg, status="resync", reason=f"node lacks base updates {lacking}",
                            metrics={"merged-through": merged})
    try:
        _, heldout = node_split(context, cfg)
        if not heldout:
            raise ValueError("federated evaluation is off for this run (fraction-evaluate 0): no held-out slice")
    except ValueError as exc:
        return status_reply(msg, status="failed", reason=str(exc), metrics={})
    start = time.perf_counter()
    base = cached_base(cfg.model)
    model = copy.deepcopy(base.model)
    fold_into_base(model, [held[r] for r in sorted(needed)] + [record_to_tensors(msg.content["global"])])
    result = evaluate(model, heldout, base.tokenizer, max_len=int(settings["max-seq-len"]))
    metrics = {
        "eval-loss": result.loss, "eval-perplexity": result.perplexity, "eval-tokens": result.tokens,
        "num-examples": result.examples, "eval-seconds": time.perf_counter() - start,
        "merged-through": max(needed or [0]), "base-loads": BASE_LOADS["count"], "process-id": os.getpid(),
    }
    return status_reply(msg, status="ok", metrics=metrics)

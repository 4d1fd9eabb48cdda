"""What a node knows and keeps: its identity, its data (and held-out slice), its caches.

Shared by the node's handlers (training, evaluation, the LoRA-SB round). The caches
live as long as the process: one message in a per-message ClientApp, the node's whole
life in the resident worker (``client.worker``).
"""

from __future__ import annotations

import functools
import hashlib

from flwr.app import Context, Message

from aggregation.base import check_rank
from core.config import RunConfig, check_node_eval_fraction
from core.data import Example, load_examples, partition, split_heldout
from core.presets import BaseModel, load_base
from core.wire import merges_to_record, record_to_merges

NODE_EVAL_FRACTION = "node-eval-fraction"  # node_config key: this node's own held-out share


# How often this process has loaded a base model: the worker's promise is once per model,
# so replies carry it (``base-loads``) and the performance suite counts it.
BASE_LOADS = {"count": 0}


@functools.lru_cache(maxsize=2)
def cached_base(model: str) -> BaseModel:
    BASE_LOADS["count"] += 1
    return load_base(model)


@functools.lru_cache(maxsize=4)
def cached_examples(data: str) -> tuple[Example, ...]:
    return tuple(load_examples(data))


def node_identity(context: Context, cfg: RunConfig) -> tuple[int, float]:
    """(rank, alpha) of this node: node_config first, else the run config by partition."""
    node = context.node_config
    if "lora-rank" in node:
        rank = int(node["lora-rank"])
    else:
        rank = cfg.rank_for_partition(int(node.get("partition-id", 0)))
    check_rank(rank, cfg.max_rank)
    alpha = float(node.get("lora-alpha", cfg.lora_alpha))
    return rank, alpha


def node_key(context: Context) -> str:
    """A name for this node that survives restarts (Flower's node ids are per run)."""
    node = context.node_config
    if "node-name" in node:
        return str(node["node-name"])
    if "partition-id" in node:
        return f"partition-{int(node['partition-id'])}"
    return str(context.node_id)


def stable_seed(*parts: object) -> int:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@functools.lru_cache(maxsize=4)
def cached_partitions(data: str, eval_fraction: float, seed: int, scheme: str, parts: int
                      ) -> tuple[tuple[Example, ...], ...]:
    """The simulated federation's split, once per run: a message reads its node's part twice
    (the ledger's data fingerprint, then ``node_split``), and in-process nodes share it."""
    train_split, _ = split_heldout(cached_examples(data), eval_fraction, seed)
    return tuple(tuple(part) for part in partition(train_split, scheme, parts, seed))


def local_examples(context: Context, cfg: RunConfig) -> list[Example]:
    node = context.node_config
    if "data-path" in node:  # deployment: the node's own file is its partition
        return list(cached_examples(str(node["data-path"])))
    parts = cached_partitions(cfg.data, cfg.eval_fraction, cfg.seed, cfg.partition,
                              int(node.get("num-partitions", 1)))
    return list(parts[int(node.get("partition-id", 0))])


def node_split(context: Context, cfg: RunConfig) -> tuple[list[Example], list[Example]]:
    """(training, held-out) of this node's data.

    The held-out slice exists only with federated evaluation on (``fraction-evaluate`` > 0):
    a deterministic share by content hash (``node-eval-fraction``, the node's own value
    first), never trained on. Without it the node trains on all of its data, as it always did.
    """
    examples = local_examples(context, cfg)
    if cfg.fraction_evaluate <= 0:
        return examples, []
    fraction = float(context.node_config.get(NODE_EVAL_FRACTION, cfg.node_eval_fraction))
    check_node_eval_fraction(fraction, where=f"node {node_key(context)}: {NODE_EVAL_FRACTION}")
    if len(examples) < 2:
        raise ValueError(f"node {node_key(context)} has {len(examples)} example(s): too few to hold one out "
                         "for federated evaluation")
    train, heldout = split_heldout(examples, fraction, cfg.seed)
    if not train:
        raise ValueError(f"node {node_key(context)}: all {len(examples)} examples are copies of one, so holding "
                         "one out for federated evaluation leaves none to train on")
    return train, heldout


def known_merges(msg: Message, context: Context) -> dict[int, dict]:
    """Base updates held from earlier rounds plus those in this message; stored back."""
    held = record_to_merges(context.state["merges"]) if "merges" in context.state.array_records else {}
    held.update(record_to_merges(msg.content["merges"]))
    context.state["merges"] = merges_to_record(sorted(held.items()))
    return held

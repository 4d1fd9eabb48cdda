"""ClientApp: answer rank queries; decode a payload, train, encode the reply.

The node's rank comes from its ``node_config`` (``lora-rank=8``) in deployment, or from
the run config's rank list by partition id in simulation. Base updates and frozen
factors received earlier are kept in the node's context state, so each round only
what is new travels; if that state was lost the node says so ("resync") and the
server resends everything it lacks next time.
"""

from __future__ import annotations

import copy
import functools

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.data import Example, load_examples, partition, split_heldout
from client.model import AdaptedModel, AdapterSpec, fold_into_base
from client.presets import BaseModel, load_base
from client.trainer import TrainConfig, train
from server.config import RunConfig, check_rank
from server.wire import merges_to_record, record_to_merges, record_to_tensors, tensors_to_record

app = ClientApp()


@functools.lru_cache(maxsize=2)
def cached_base(model: str) -> BaseModel:
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


def local_examples(context: Context, cfg: RunConfig) -> list[Example]:
    node = context.node_config
    if "data-path" in node:  # deployment: the node's own file is its partition
        return list(cached_examples(str(node["data-path"])))
    train_split, _ = split_heldout(cached_examples(cfg.data), cfg.eval_fraction, cfg.seed)
    parts = partition(train_split, cfg.partition, int(node.get("num-partitions", 1)), cfg.seed)
    return parts[int(node.get("partition-id", 0))]


@app.query()
def query(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_flower(context.run_config)
    rank, alpha = node_identity(context, cfg)
    info = MetricRecord({"rank": rank, "alpha": alpha, "num-examples": len(local_examples(context, cfg))})
    return Message(RecordDict({"info": info}), reply_to=msg)


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_flower(context.run_config)
    settings = msg.content["config"]
    rank, alpha = int(settings["rank"]), float(settings["alpha"])
    server_round = int(settings["server-round"])

    merges = _known_merges(msg, context)
    needed = [r for r in settings["merge-rounds"] if r > 0]
    lacking = [r for r in needed if r not in merges]
    frozen = _known_frozen(msg, context, str(settings["frozen-hash"]))
    if lacking or (settings["frozen-hash"] and frozen is None):
        reason = f"node lacks base updates {lacking}" if lacking else "node lacks frozen factors"
        merged = max([r for r in merges if all(q in merges for q in needed if q <= r)] or [0])
        return _reply(msg, status="resync", reason=reason, metrics={"merged-through": merged})

    base = cached_base(cfg.model)
    model = copy.deepcopy(base.model)
    fold_into_base(model, [merges[r] for r in sorted(needed)])
    torch.manual_seed(hash((cfg.seed, server_round, msg.metadata.dst_node_id)) % 2**31)
    adapted = AdaptedModel(
        model, AdapterSpec(kind=str(settings["adapter-kind"]), rank=rank, alpha=alpha, targets=cfg.targets)
    )
    if frozen:
        adapted.load(frozen)
    adapter = record_to_tensors(msg.content["adapter"])
    if adapter:
        adapted.load(adapter)
    adapted.set_trainable(frozenset(str(settings["trainable"]).split(",")))

    examples = local_examples(context, cfg)
    result = train(
        adapted,
        examples,
        base.tokenizer,
        TrainConfig(
            steps=int(settings["local-steps"]),
            batch_size=int(settings["batch-size"]),
            learning_rate=float(settings["learning-rate"]),
            max_len=int(settings["max-seq-len"]),
            seed=cfg.seed + server_round * 7919 + int(context.node_config.get("partition-id", 0)),
        ),
    )
    uplink = str(settings["uplink"]).split(",")
    metrics = {
        "num-examples": len(examples),
        "train-loss": result.mean_loss,
        "train-loss-first": result.first_loss,
        "train-loss-last": result.last_loss,
        "train-seconds": result.seconds,
        "steps": result.steps,
        "merged-through": max(needed or [0]),
    }
    reply = _reply(msg, status="ok", metrics=metrics, frozen_hash=str(settings["frozen-hash"]))
    reply.content["update"] = tensors_to_record(adapted.export(uplink))
    return reply


def _known_merges(msg: Message, context: Context) -> dict[int, dict]:
    """Base updates held from earlier rounds plus those in this message; stored back."""
    held = record_to_merges(context.state["merges"]) if "merges" in context.state.array_records else {}
    held.update(record_to_merges(msg.content["merges"]))
    context.state["merges"] = merges_to_record(sorted(held.items()))
    return held


def _known_frozen(msg: Message, context: Context, want: str) -> dict | None:
    if not want:
        return None
    if "frozen" in msg.content.array_records:
        context.state["frozen"] = msg.content["frozen"]
        context.state["frozen-hash"] = ConfigRecord({"hash": want})
    elif "frozen-hash" not in context.state.config_records or context.state["frozen-hash"]["hash"] != want:
        return None
    return record_to_tensors(context.state["frozen"])


def _reply(msg: Message, *, status: str, metrics: dict, reason: str = "", frozen_hash: str = "") -> Message:
    content = RecordDict(
        {
            "status": ConfigRecord({"status": status, "reason": reason, "frozen-hash": frozen_hash}),
            "metrics": MetricRecord(metrics),
            "update": ArrayRecord(),
        }
    )
    return Message(content, reply_to=msg)

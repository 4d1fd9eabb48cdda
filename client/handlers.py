"""The node's work: answer rank queries; decode a payload, train, encode the reply.

These handlers hold everything heavy (torch, transformers, PEFT, Opacus) and the
node's caches (base model, tokenizer, examples). They run either inside the
per-message ClientApp process (simulation; a SuperNode started by hand) or inside the
node's resident worker (``client.worker``), where the caches outlive the message.

The node's rank comes from its ``node_config`` (``lora-rank=8``) in deployment, or from
the run config's rank list by partition id in simulation. Base updates and frozen
factors received earlier are kept in the node's context state, so each round only
what is new travels; if that state was lost the node says so ("resync") and the
server resends everything it lacks next time.

With DP-SGD on for the node (run or node config, ``privacy/``), the round is planned
against the node's durable privacy ledger first: a round that would pass the target ε
is declined ("declined" with the reason) before the model is even built. A round that
breaks after planning answers "failed" with the reason and the ledger's ε (the
reservation may already be spent), and a node whose own dp-* config is invalid answers
"failed" without training.
"""

from __future__ import annotations

import contextlib
import copy
import os
import traceback
from logging import ERROR

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import log

from core.data import Example
from core.model import AdaptedModel, AdapterSpec, fold_into_base
from core.trainer import TrainConfig, device, train
from privacy.central import clip_update
from privacy.accounting import epsilon
from privacy.ledger import PrivacyLedger, dataset_fingerprint
from privacy.private_round import PrivateRound, private_round
from privacy.settings import check_node_config, local_dp, parse_run_config
from client import evaluate as node_evaluate  # federated evaluation on the node's held-out slice
from client import lora_sb  # Fed-SB's federated LoRA-SB init (round 0)
from client.messages import status_reply
from client.personal import PersonalRound, personal_factors
from client.node import (  # noqa: F401  (re-exported: the node's helpers, used by tests and by the worker)
    BASE_LOADS, cached_base, known_merges, local_examples, node_identity, node_key, node_split, stable_seed,
)
from core.config import RunConfig
from core.wire import record_to_tensors, tensors_to_record

def query(msg: Message, context: Context) -> Message:
    cfg = parse_run_config(context.run_config)
    rank, alpha = node_identity(context, cfg)
    info = MetricRecord({"rank": rank, "alpha": alpha, "num-examples": len(node_split(context, cfg)[0])})
    return Message(RecordDict({"info": info, "identity": ConfigRecord({"node-key": node_key(context)})}), reply_to=msg)


def train_handler(msg: Message, context: Context) -> Message:
    # the stack holds this node's privacy-ledger lock (DP on) until the reply is built
    with contextlib.ExitStack() as stack:
        return _train(msg, context, stack)


def _train(msg: Message, context: Context, stack: contextlib.ExitStack) -> Message:
    try:
        check_node_config(context.node_config)
    except ValueError as exc:
        # a node_config written by hand for flower-supernode never passed `client start`'s
        # check, and an ignored dp-* key would drop the node's own budget: never train on it
        return _reply(msg, status="failed", reason=str(exc), metrics={})
    cfg = parse_run_config(context.run_config)
    settings = msg.content["config"]

    merges = known_merges(msg, context)
    needed = [r for r in settings["merge-rounds"] if r > 0]
    lacking = [r for r in needed if r not in merges]
    frozen = _known_frozen(msg, context, str(settings["frozen-hash"]))
    if lacking or (settings["frozen-hash"] and frozen is None):
        reason = f"node lacks base updates {lacking}" if lacking else "node lacks frozen factors"
        merged = max([r for r in merges if all(q in merges for q in needed if q <= r)] or [0])
        return _reply(msg, status="resync", reason=reason, metrics={"merged-through": merged})

    examples, _ = node_split(context, cfg)  # never the held-out slice of federated evaluation
    dp_round = _private_round(context, cfg, settings, examples, stack)
    held = {"merged-through": max(needed or [0])}
    if dp_round is not None and dp_round.declined:
        return _reply(msg, status="declined", reason=dp_round.reason, metrics={**dp_round.metrics(), **held},
                      frozen_hash=str(settings["frozen-hash"]))
    try:
        return _trained(msg, context, cfg, examples=examples, merges=[merges[r] for r in sorted(needed)],
                        frozen=frozen, dp_round=dp_round, held=held)
    except Exception as exc:
        if dp_round is None:
            raise  # nothing was charged: Flower's own error reply says what failed
        # The ledger may already hold this round's reservation. A failed reply that carries
        # the ε it holds keeps the server's record, and the run's max ε, from falling below it.
        log(ERROR, "DP-SGD round failed after planning:\n%s", traceback.format_exc())
        return _reply(msg, status="failed", reason=f"{type(exc).__name__}: {exc}",
                      metrics={**dp_round.metrics(), **held}, frozen_hash=str(settings["frozen-hash"]))


def _trained(msg: Message, context: Context, cfg: RunConfig, *, examples: list[Example], merges: list[dict],
             frozen: dict | None, dp_round: PrivateRound | None, held: dict[str, int]) -> Message:
    """Build the model, train one round and encode the "ok" reply."""
    settings = msg.content["config"]
    rank, alpha = int(settings["rank"]), float(settings["alpha"])
    server_round = int(settings["server-round"])
    base = cached_base(cfg.model)
    model = copy.deepcopy(base.model)
    fold_into_base(model, merges)
    if dp_round is not None:
        model.to(device())  # DP order: model, device, adapters, optimizer, make_private
    # seeded by the stable node key, so a resumed or repeated run trains identically
    torch.manual_seed(stable_seed(cfg.seed, server_round, node_key(context)))
    adapted = AdaptedModel(
        model, AdapterSpec(kind=str(settings["adapter-kind"]), rank=rank, alpha=alpha, targets=cfg.targets)
    )
    if frozen:
        adapted.load(frozen)
    adapter = record_to_tensors(msg.content["adapter"])
    if adapter:
        adapted.load(adapter)
    adapted.set_trainable(frozenset(str(settings["trainable"]).split(",")))
    # factors trained here but never uploaded (FedSA-LoRA's B): this node's own, kept between rounds
    own = PersonalRound.start(context=context, cfg=cfg, adapted=adapted, factors=personal_factors(settings),
                              examples=examples, node=_ledger_identity(context), private=dp_round is not None)

    result = train(
        adapted,
        own.train_examples,
        base.tokenizer,
        TrainConfig(
            steps=dp_round.steps if dp_round is not None else int(settings["local-steps"]),
            batch_size=int(settings["batch-size"]),
            learning_rate=float(settings["learning-rate"]),
            max_len=int(settings["max-seq-len"]),
            seed=stable_seed(cfg.seed, server_round, node_key(context), "batches"),
        ),
        privacy=dp_round.hook() if dp_round is not None else None,
    )
    uplink = str(settings["uplink"]).split(",")
    metrics = {
        "num-examples": len(own.train_examples),
        "train-loss": result.mean_loss,
        "train-loss-first": result.first_loss,
        "train-loss-last": result.last_loss,
        "train-seconds": result.seconds,
        "steps": result.steps,
        "base-loads": BASE_LOADS["count"],
        "process-id": os.getpid(),  # which process trained: a worker, a Ray actor, a one-off ClientApp
        **held,
        **(dp_round.metrics() if dp_round is not None else {}),
        **own.finish(context=context, adapted=adapted, tokenizer=base.tokenizer, max_len=int(settings["max-seq-len"]),
                     server_round=server_round),
    }
    update = adapted.export(uplink)
    if cfg.dp_central_clip > 0:  # central DP: bound this node's whole-round contribution
        update = clip_update(update, adapter, scale=alpha / rank, bound=cfg.dp_central_clip)
    reply = _reply(msg, status="ok", metrics=metrics, frozen_hash=str(settings["frozen-hash"]))
    reply.content["update"] = tensors_to_record(update)
    return reply


def _private_round(
    context: Context, cfg: RunConfig, settings: ConfigRecord, examples: list[Example], stack: contextlib.ExitStack
) -> PrivateRound | None:
    """This round's DP-SGD plan when DP-SGD is on for this node (run or node config)."""
    dp = local_dp(context.run_config, context.node_config)
    if dp is None:
        return None
    return stack.enter_context(
        private_round(
            settings=dp, node=_ledger_identity(context), examples=examples, run_key=cfg.run_tag or str(context.run_id),
            # the ledger is the node's whole data's (held-out slice included: its evaluations are
            # releases too), so switching federated evaluation on never opens a fresh ledger
            fingerprint=dataset_fingerprint(local_examples(context, cfg)),
            batch_size=int(settings["batch-size"]), local_steps=int(settings["local-steps"]),
            planned_rounds=cfg.num_server_rounds,
        )
    )


def _ledger_identity(context: Context) -> str:
    # the ledger must find the same file next run: a stable name, never Flower's per-run node id
    node = context.node_config
    return node_key(context) if ("node-name" in node or "partition-id" in node) else "local"


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
    return status_reply(msg, status=status, metrics=metrics, reason=reason, frozen_hash=frozen_hash)


# Flower action -> handler; the thin ClientApp (client.app) registers the same names and
# the worker (client.worker) serves exactly these.
HANDLERS = {"query": query, "train": train_handler, node_evaluate.ACTION: node_evaluate.handle,
            lora_sb.ACTION: lora_sb.handle}


def ledger_metrics(context: Context) -> dict[str, float]:
    """The ε this node's ledger holds, for a reply about a round that was lost mid-way.

    Empty when DP-SGD is off for the node; the server records the reply's ε like any other,
    so the run's max ε never falls below what the ledger spent.
    """
    dp = local_dp(context.run_config, context.node_config)
    if dp is None:
        return {}
    cfg = parse_run_config(context.run_config)
    ledger = PrivacyLedger(directory=dp.ledger_directory(), node=_ledger_identity(context),
                           dataset=dataset_fingerprint(local_examples(context, cfg)))
    history = ledger.load().history
    return {"dp-epsilon": epsilon(history, delta=dp.delta, accountant=dp.accountant) if history else 0.0,
            "dp-delta": dp.delta}

"""Reading one client's reply: what a node sent becomes an outcome, and an update when it trained.

Everything here reads what a client sent, so any malformation is the client's fault and
must not stop the server: it becomes a rejection with a reason, never an exception. What
the reply says about the node itself (the base updates it has folded in, the frozen
factors it holds) comes back as ``Beliefs`` for the strategy to keep; nothing passed in
is modified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from aggregation import Aggregator, ClientUpdate, ModelSpec
from core.wire import PayloadError, record_bytes, record_to_tensors
from server.rounds import CLIENT_STATUSES, ClientOutcome, NodeState
from server.validation import UpdateLimits, check_size, check_update


@dataclass(frozen=True)
class Beliefs:
    """What a reply says the node holds (``NodeState.merged_through`` / ``frozen_hash``)."""

    merged_through: int
    frozen_hash: str


@dataclass(frozen=True)
class ReadReply:
    outcome: ClientOutcome
    update: ClientUpdate | None = None
    beliefs: Beliefs | None = None  # None: the reply said nothing readable about the node


def read_reply(*, node: int, reply: Message, bytes_down: int, known: NodeState, spec: ModelSpec,
               aggregator: Aggregator, limits: UpdateLimits, uplink: frozenset[str] | None = None) -> ReadReply:
    """The outcome of node ``node``'s reply to a train message that cost ``bytes_down``.

    ``uplink``: the factors the node was asked to upload (``Downlink.uplink``); None: the method's own.
    """
    if reply.has_error():
        return ReadReply(ClientOutcome(node, "failed", f"client error: {reply.error.reason}", rank=known.rank,
                                       bytes_down=bytes_down))
    base: dict[str, Any] = dict(node_id=node, bytes_down=bytes_down, rank=known.rank)
    beliefs = None
    try:
        content = reply.content
        base["bytes_up"] = record_bytes(content)
        metrics = dict(content["metrics"]) if "metrics" in content.metric_records else {}
        base["metrics"] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        status_record = content.config_records.get("status", ConfigRecord({"status": "ok"}))
        beliefs = Beliefs(merged_through=int(metrics.get("merged-through", known.merged_through)),
                          frozen_hash=str(status_record.get("frozen-hash", "")))
        status = str(status_record.get("status", "ok"))
        if status not in CLIENT_STATUSES:
            raise PayloadError(f"unknown reply status {status!r}; expected one of {sorted(CLIENT_STATUSES)}")
        if status != "ok":
            return ReadReply(ClientOutcome(status=status, reason=str(status_record.get("reason") or status), **base),
                             beliefs=beliefs)
        check_size(base["bytes_up"], limits)
        update = decode_update(content, known=known, spec=spec, aggregator=aggregator, uplink=uplink)
    except Exception as exc:  # noqa: BLE001 - a client's malformation is a rejection (module docstring)
        return ReadReply(ClientOutcome(status="rejected", reason=reason(exc), **base), beliefs=beliefs)
    outcome = ClientOutcome(status="ok", num_examples=update.num_examples, train_loss=update.metrics["train-loss"],
                            seconds=base["metrics"].get("train-seconds"), **base)
    return ReadReply(outcome, update=update, beliefs=beliefs)


def decode_update(content: RecordDict, *, known: NodeState, spec: ModelSpec, aggregator: Aggregator,
                  uplink: frozenset[str] | None = None) -> ClientUpdate:
    """A trained reply's tensors, checked against the node's rank and what it was asked to upload."""
    if "update" not in content.array_records:
        raise PayloadError("reply has no 'update' record")
    tensors = record_to_tensors(content["update"])
    check_update(tensors, spec, aggregator, known.rank, uplink=uplink)
    metrics = content["metrics"]
    loss = float(metrics["train-loss"])
    if not np.isfinite(loss):
        raise ValueError(f"train-loss is {loss}")
    return ClientUpdate(
        node_id=known.key,
        num_examples=int(metrics["num-examples"]),
        rank=known.rank,
        alpha=known.alpha,
        tensors={m: {k: v.astype(np.float64) for k, v in f.items()} for m, f in tensors.items()},
        metrics={"train-loss": loss},
    )


def reason(exc: Exception) -> str:
    if isinstance(exc, (PayloadError, ValueError)):
        return str(exc)
    if isinstance(exc, KeyError):
        return f"missing field {exc}"
    return f"{type(exc).__name__}: {exc}"

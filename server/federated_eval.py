"""Federated evaluation, the server's side: which nodes evaluate, what they get, what they said.

In an evaluated round (``eval-every``; round 0 is the server's own), ``fraction-evaluate``
of the connected nodes — at least one, picked by a generator seeded with the run's seed
and the round, so training's sampling is unaffected — each receive the round's global
adapter as folded factors and the base updates they lack, and score it on their own
held-out slice (``client.evaluate``). The round's aggregate is the example-weighted mean
of the nodes' losses (perplexity its exp); the spread (worst, median, best node) is what
shows a global adapter that serves the big nodes and fails a small one.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from aggregation import Tensors
from core.wire import merges_to_record, record_bytes, tensors_to_record
from server.rounds import NodeState

__all__ = ["NodeEvaluationResult", "RoundEvaluation", "evaluation_messages", "pick", "read_evaluation"]


@dataclass(frozen=True)
class NodeEvaluationResult:
    node_id: int
    key: str
    status: str  # ok | failed | resync
    reason: str | None = None
    loss: float | None = None
    perplexity: float | None = None
    num_examples: int | None = None
    tokens: int | None = None
    seconds: float | None = None
    bytes_down: int = 0
    merged_through: int | None = None


@dataclass(frozen=True)
class RoundEvaluation:
    number: int
    nodes: tuple[NodeEvaluationResult, ...]

    @property
    def ok(self) -> list[NodeEvaluationResult]:
        return [n for n in self.nodes if n.status == "ok"]

    @property
    def loss(self) -> float | None:
        ok = self.ok
        if not ok:
            return None
        weights = np.array([n.num_examples for n in ok], float)
        return float(np.dot(weights / weights.sum(), [n.loss for n in ok]))

    @property
    def perplexity(self) -> float | None:
        loss = self.loss
        # capped as the node caps its own (core.trainer.evaluate): a node's loss of 1000 must not raise here
        return None if loss is None else math.exp(min(loss, 50.0))

    def spread(self) -> dict[str, float]:
        """The worst, median and best node's loss (empty when no node evaluated)."""
        losses = [n.loss for n in self.ok]
        if not losses:
            return {}
        return {"worst": max(losses), "median": statistics.median(losses), "best": min(losses)}


def pick(nodes: list[int], *, fraction: float, seed: int, server_round: int) -> list[int]:
    """``fraction`` of ``nodes`` (at least one), the same for the same seed and round."""
    if not nodes or fraction <= 0:
        return []
    # less a hair before the ceiling: 0.07 x 100 is 7.000000000000001 in floating point, and means 7
    k = min(len(nodes), max(1, math.ceil(fraction * len(nodes) - 1e-9)))
    rng = np.random.default_rng([seed, server_round, 0xE7A1])  # never the training sampler's stream
    return sorted(nodes[i] for i in rng.choice(len(nodes), size=k, replace=False))


def evaluation_messages(*, server_round: int, nodes: Mapping[int, NodeState], global_delta: Tensors,
                        merge_log: list[tuple[int, Tensors]], max_seq_len: int) -> list[Message]:
    messages = []
    for node, known in nodes.items():
        content = RecordDict({
            "global": tensors_to_record(global_delta),
            "merges": merges_to_record((r, t) for r, t in merge_log if r > known.merged_through),
            "config": ConfigRecord({"server-round": server_round, "max-seq-len": max_seq_len,
                                    "merge-rounds": [r for r, _ in merge_log] or [0]}),
        })
        messages.append(Message(content, dst_node_id=node, message_type=MessageType.EVALUATE))
    return messages


def read_evaluation(reply: Message, *, key: str, bytes_down: int) -> NodeEvaluationResult:
    node = reply.metadata.src_node_id
    if reply.has_error():
        return NodeEvaluationResult(node, key, "failed", f"evaluation failed: {reply.error.reason}",
                                    bytes_down=bytes_down)
    try:
        status = reply.content["status"]
        metrics = reply.content["metrics"]
        merged = int(metrics["merged-through"]) if "merged-through" in metrics else None
        if status["status"] != "ok":
            return NodeEvaluationResult(node, key, str(status["status"]), str(status["reason"]) or None,
                                        bytes_down=bytes_down, merged_through=merged)
        loss = float(metrics["eval-loss"])
        if not math.isfinite(loss) or loss < 0:  # a cross-entropy: finite and never below 0
            raise ValueError(f"eval-loss {loss} is not a finite loss >= 0")
        examples = int(metrics["num-examples"])
        if examples < 1:  # it weighs the aggregate: zero would divide by zero, a negative flip it
            raise ValueError(f"num-examples {examples} is not a positive count")
        return NodeEvaluationResult(
            node, key, "ok", loss=loss, perplexity=float(metrics["eval-perplexity"]),
            num_examples=examples, tokens=int(metrics["eval-tokens"]),
            seconds=float(metrics["eval-seconds"]), bytes_down=bytes_down, merged_through=merged,
        )
    except (KeyError, TypeError, ValueError) as exc:
        return NodeEvaluationResult(node, key, "failed", f"malformed evaluation reply: {exc}", bytes_down=bytes_down)


def collect(replies: Iterable[Message], *, sent: Mapping[int, int], keys: Mapping[int, str],
            server_round: int) -> RoundEvaluation:
    """The round's evaluation: every node asked, answered or not (``sent``: node -> bytes down)."""
    got = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if node in sent:
            got[node] = read_evaluation(reply, key=keys[node], bytes_down=sent[node])
    for node in set(sent) - set(got):
        got[node] = NodeEvaluationResult(node, keys[node], "failed", "no evaluation reply before the deadline",
                                         bytes_down=sent[node])
    return RoundEvaluation(number=server_round, nodes=tuple(got[n] for n in sorted(got, key=lambda n: keys[n])))


def bytes_of(message: Message) -> int:
    return record_bytes(message.content)

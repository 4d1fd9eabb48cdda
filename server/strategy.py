"""The only Flower-aware adapter between the message loop and an ``Aggregator``.

Per round it samples nodes, learns the rank of nodes it has not seen (a ``query``
message: the node says its rank, never assumed), builds *one new RecordDict per node*
from ``aggregator.downlink`` (Flower's FedAvg shares one RecordDict between messages,
so editing it would leak between nodes), and turns replies into ``ClientUpdate``s,
rejecting any reply that does not match the aggregator's ``uplink`` declaration.

Base updates (FLoRA's stack, FedEx-LoRA's residual) go into a log; each node is sent
the entries after the last one it has acknowledged, so a node that sat out rounds
catches up exactly, and the bytes that costs are counted in its downlink.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from aggregation import Aggregator, ClientInfo, ClientUpdate, ModelSpec, Tensors
from aggregation.base import expected_shapes
from aggregation.diagnostics import relative_error
from server.wire import (
    PayloadError,
    merges_to_record,
    record_bytes,
    record_to_tensors,
    tensors_to_record,
)


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass
class NodeState:
    """What the server believes a node holds; corrected by the node's own replies."""

    rank: int
    alpha: float
    num_examples: int
    merged_through: int = 0  # last base-update round the node has folded in
    frozen_hash: str = ""


@dataclass(frozen=True)
class ClientOutcome:
    node_id: int
    status: str  # ok | rejected | failed | resync | declined
    reason: str | None = None
    rank: int | None = None
    num_examples: int | None = None
    train_loss: float | None = None
    seconds: float | None = None
    bytes_down: int = 0
    bytes_up: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundReport:
    number: int
    started_at: datetime
    finished_at: datetime
    outcomes: tuple[ClientOutcome, ...]
    aggregated: bool
    train_loss: float | None
    relative_error: float | None
    aggregate_seconds: float

    @property
    def bytes_down(self) -> int:
        return sum(o.bytes_down for o in self.outcomes)

    @property
    def bytes_up(self) -> int:
        return sum(o.bytes_up for o in self.outcomes)

    @property
    def num_ok(self) -> int:
        return sum(o.status == "ok" for o in self.outcomes)


def tensors_hash(tensors: Tensors) -> str:
    digest = hashlib.sha256()
    for module in sorted(tensors):
        for factor in sorted(tensors[module]):
            digest.update(f"{module}|{factor}".encode())
            digest.update(np.ascontiguousarray(tensors[module][factor], np.float32).tobytes())
    return digest.hexdigest()[:16]


class LoraStrategy(Strategy):
    """Federated LoRA with any registered aggregator and heterogeneous client ranks."""

    def __init__(
        self,
        *,
        aggregator: Aggregator,
        spec: ModelSpec,
        train_config: dict[str, int | float | str],
        clients_per_round: int,
        min_clients: int,
        query_timeout: float = 600.0,
        round_timeout: float = 3600.0,
    ) -> None:
        self.aggregator = aggregator
        self.spec = spec
        self.train_config = dict(train_config)
        self.clients_per_round = clients_per_round
        self.min_clients = min_clients
        self.query_timeout = query_timeout
        self.round_timeout = round_timeout
        self.state = aggregator.init_state(spec)
        self.merge_log: list[tuple[int, Tensors]] = []
        self.nodes: dict[int, NodeState] = {}
        self.rng = np.random.default_rng(spec.seed)
        self.last_report: RoundReport | None = None
        self._pending: dict[int, ClientOutcome] = {}
        self._sent_state: object = None
        self._round_started = utcnow()

    # --- sampling and rank discovery ----------------------------------------------------

    def _sample(self, grid: Grid) -> list[int]:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) < self.min_clients:
            raise RuntimeError(
                f"only {len(node_ids)} nodes connected; min-clients is {self.min_clients}"
            )
        k = min(self.clients_per_round, len(node_ids))
        picked = self.rng.choice(len(node_ids), size=k, replace=False)
        return [node_ids[i] for i in sorted(picked)]

    def _discover(self, grid: Grid, node_ids: list[int]) -> dict[int, ClientOutcome]:
        """Ask unseen nodes for their rank; returns outcomes for nodes refused here."""
        unknown = [n for n in node_ids if n not in self.nodes]
        refused: dict[int, ClientOutcome] = {}
        if not unknown:
            return refused
        messages = [
            Message(RecordDict({"config": ConfigRecord({"max-rank": self.spec.max_rank})}),
                    dst_node_id=n, message_type=MessageType.QUERY)
            for n in unknown
        ]
        answered = set()
        for reply in grid.send_and_receive(messages, timeout=self.query_timeout):
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                refused[node] = ClientOutcome(node, "failed", f"query failed: {reply.error.reason}")
                continue
            info = reply.content["info"]
            rank, alpha = int(info["rank"]), float(info["alpha"])
            if not 1 <= rank <= self.spec.max_rank:
                refused[node] = ClientOutcome(
                    node, "rejected", f"rank {rank} outside 1..{self.spec.max_rank}", rank=rank
                )
                continue
            self.nodes[node] = NodeState(rank=rank, alpha=alpha, num_examples=int(info["num-examples"]))
        for node in set(unknown) - answered:
            refused[node] = ClientOutcome(node, "failed", "no answer to the rank query")
        return refused

    # --- Strategy interface ---------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_started = utcnow()
        sampled = self._sample(grid)
        self._pending = self._discover(grid, sampled)
        self._sent_state = self.state
        messages = []
        for node in sampled:
            if node in self._pending:
                continue
            content = self._payload(server_round, node)
            self._pending[node] = ClientOutcome(node, "failed", "no reply", bytes_down=record_bytes(content))
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        log(INFO, "configure_train: %d nodes sampled, %d messages", len(sampled), len(messages))
        return messages

    def _payload(self, server_round: int, node: int) -> RecordDict:
        known = self.nodes[node]
        client = ClientInfo(node_id=str(node), rank=known.rank, alpha=known.alpha)
        down = self.aggregator.downlink(self.state, client)
        frozen_hash = tensors_hash(down.frozen) if down.frozen else ""
        settings = {
            **self.train_config,
            "server-round": server_round,
            "rank": known.rank,
            "alpha": known.alpha,
            "adapter-kind": self.aggregator.adapter_kind,
            "trainable": ",".join(sorted(down.trainable)),
            "uplink": ",".join(sorted(self.aggregator.uplink)),
            "merge-rounds": [r for r, _ in self.merge_log] or [0],
            "frozen-hash": frozen_hash,
        }
        content = RecordDict(
            {
                "adapter": tensors_to_record(down.adapter),
                "merges": merges_to_record((r, t) for r, t in self.merge_log if r > known.merged_through),
                "config": ConfigRecord(settings),
            }
        )
        if down.frozen and known.frozen_hash != frozen_hash:
            content["frozen"] = tensors_to_record(down.frozen)
        return content

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates: list[ClientUpdate] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            sent = self._pending.get(node)
            if sent is None:
                continue  # a reply we did not ask for this round
            outcome, update = self._check_reply(node, reply, sent.bytes_down)
            self._pending[node] = outcome
            if update is not None:
                updates.append(update)
        start = time.perf_counter()
        aggregated, rel_err, loss = False, None, None
        if len(updates) >= self.min_clients:
            result = self.aggregator.aggregate(self._sent_state, updates)
            rel_err = relative_error(self.aggregator, self._sent_state, result, updates)
            self.state = result.state
            if result.base_update:
                self.merge_log.append((server_round, result.base_update))
            aggregated = True
            weights = np.array([u.num_examples for u in updates], float)
            loss = float(np.dot(weights / weights.sum(), [u.metrics["train-loss"] for u in updates]))
        else:
            log(WARNING, "round %d: %d usable replies < min-clients %d; global state unchanged",
                server_round, len(updates), self.min_clients)
        self.last_report = RoundReport(
            number=server_round,
            started_at=self._round_started,
            finished_at=utcnow(),
            outcomes=tuple(self._pending[n] for n in sorted(self._pending)),
            aggregated=aggregated,
            train_loss=loss,
            relative_error=rel_err,
            aggregate_seconds=time.perf_counter() - start,
        )
        metrics = {"num-aggregated": len(updates)}
        if loss is not None:
            metrics["train-loss"] = loss
        if rel_err is not None:
            metrics["relative-error"] = rel_err
        return ArrayRecord(), MetricRecord(metrics)

    def _check_reply(
        self, node: int, reply: Message, bytes_down: int
    ) -> tuple[ClientOutcome, ClientUpdate | None]:
        if reply.has_error():
            return ClientOutcome(node, "failed", f"client error: {reply.error.reason}", bytes_down=bytes_down), None
        content = reply.content
        bytes_up = record_bytes(content)
        status = str(content["status"]["status"]) if "status" in content.config_records else "ok"
        metrics = dict(content["metrics"]) if "metrics" in content.metric_records else {}
        known = self.nodes[node]
        known.merged_through = int(metrics.get("merged-through", known.merged_through))
        if "frozen-hash" in content.config_records.get("status", {}):
            known.frozen_hash = str(content["status"]["frozen-hash"])
        base = dict(node_id=node, bytes_down=bytes_down, bytes_up=bytes_up, rank=known.rank,
                    metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        if status != "ok":
            reason = str(content["status"].get("reason", status))
            return ClientOutcome(status=status, reason=reason, **base), None
        try:
            update = self._decode(node, content, known)
        except (PayloadError, KeyError, ValueError) as exc:
            return ClientOutcome(status="rejected", reason=str(exc), **base), None
        return (
            ClientOutcome(status="ok", num_examples=update.num_examples,
                          train_loss=update.metrics["train-loss"],
                          seconds=float(metrics.get("train-seconds", 0.0)), **base),
            update,
        )

    def _decode(self, node: int, content: RecordDict, known: NodeState) -> ClientUpdate:
        if "update" not in content.array_records:
            raise PayloadError("reply has no 'update' record")
        tensors = record_to_tensors(content["update"])
        check_update(tensors, self.spec, self.aggregator, known.rank)
        metrics = content["metrics"]
        loss = float(metrics["train-loss"])
        if not np.isfinite(loss):
            raise ValueError(f"train-loss is {loss}")
        return ClientUpdate(
            node_id=str(node),
            num_examples=int(metrics["num-examples"]),
            rank=known.rank,
            alpha=known.alpha,
            tensors={m: {k: v.astype(np.float64) for k, v in f.items()} for m, f in tensors.items()},
            metrics={"train-loss": loss},
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # evaluation of the global adapter happens on the server (evaluate_fn)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log(INFO, "\t├── Aggregator: %s", getattr(self.aggregator, "name", type(self.aggregator).__name__))
        log(INFO, "\t├── Clients per round: %d (min %d)", self.clients_per_round, self.min_clients)
        log(INFO, "\t└── Adapted modules: %d, max rank %d", len(self.spec.modules), self.spec.max_rank)


def check_update(tensors: Tensors, spec: ModelSpec, aggregator: Aggregator, rank: int) -> None:
    """Refuse missing/extra modules or factors, wrong shapes and non-finite values."""
    missing = sorted(set(spec.modules) - set(tensors))
    extra = sorted(set(tensors) - set(spec.modules))
    if missing or extra:
        raise PayloadError(f"modules missing {missing[:3]} / unexpected {extra[:3]}")
    for name, factors in tensors.items():
        want = expected_shapes(aggregator.adapter_kind, aggregator.uplink, spec.modules[name], rank)
        if set(factors) != set(want):
            raise PayloadError(f"{name}: factors {sorted(factors)}, expected {sorted(want)}")
        for key, shape in want.items():
            value = factors[key]
            if tuple(value.shape) != shape:
                raise PayloadError(
                    f"{name}.{key}: shape {tuple(value.shape)} does not match rank {rank} ({shape})"
                )
            if not np.isfinite(value).all():
                raise PayloadError(f"{name}.{key}: contains NaN or Inf")

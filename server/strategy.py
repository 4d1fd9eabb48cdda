"""The only Flower-aware adapter between the message loop and an ``Aggregator``.

Per round it samples nodes, builds *one new RecordDict per node* from
``aggregator.downlink`` (Flower's FedAvg shares one RecordDict between messages, so
editing it would leak between nodes), and turns replies into ``ClientUpdate``s,
rejecting any reply that does not match what it was asked to upload (the aggregator's
``uplink``, or the round's ``Downlink.uplink`` where the method varies it by round).

Nodes are known by what they say about themselves (``server.discovery``: the rank
query), never by assumption. Sampling is over the
stable keys, because Flower gives nodes new ids in every run: a resumed run then
samples the same clients as an uninterrupted one.

Base updates (FLoRA's stack, FedEx-LoRA's residual) go into a log; each node is sent
the entries after the last one it has acknowledged, so a node that sat out rounds
catches up exactly, and the bytes that costs are counted in its downlink.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from aggregation import Aggregator, ClientInfo, ClientUpdate, ModelSpec, Tensors
from aggregation.diagnostics import relative_error
from server import federated_eval as fed_eval
from server.discovery import NodeDirectory
from server.replies import read_reply
from server.rounds import (
    ClientOutcome,
    InsufficientReplies,
    NodeState,
    RoundReport,
    tensors_hash,
    utcnow,
)
from server.threads import math_limits
from server.validation import UpdateLimits, norm_outliers
from core.wire import merges_to_record, record_bytes, tensors_to_record

__all__ = ["LoraStrategy"]


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
        limits: UpdateLimits | None = None,
        round_retries: int = 1,
        on_insufficient: str = "stop",
        query_timeout: float = 600.0,
        round_timeout: float = 3600.0,
        fraction_evaluate: float = 0.0,
    ) -> None:
        if on_insufficient not in ("stop", "skip"):
            raise ValueError(f"on-insufficient must be 'stop' or 'skip', got {on_insufficient!r}")
        self.aggregator = aggregator
        self.spec = spec
        self.train_config = dict(train_config)
        self.clients_per_round = clients_per_round
        self.min_clients = min_clients
        self.limits = limits or UpdateLimits()
        self.round_retries = round_retries
        self.on_insufficient = on_insufficient
        self.query_timeout = query_timeout
        self.round_timeout = round_timeout
        self.state: Any = aggregator.init_state(spec)
        self.merge_log: list[tuple[int, Tensors]] = []
        self.directory = NodeDirectory(max_rank=spec.max_rank, query_timeout=query_timeout)
        self.rng = np.random.default_rng(spec.seed)
        self.last_report: RoundReport | None = None
        self._pending: dict[int, ClientOutcome] = {}
        self._sent_state: Any = None
        self._grid: Grid | None = None
        self._round_started = utcnow()
        self.fraction_evaluate = fraction_evaluate
        self.last_evaluation: fed_eval.RoundEvaluation | None = None
        self._evaluating: dict[int, int] = {}  # node -> bytes sent, this round's federated evaluation
        self._uplinks: dict[int, frozenset[str]] = {}  # what each node was asked to upload this round

    # --- node discovery and sampling ------------------------------------------------------

    @property
    def nodes(self) -> dict[int, NodeState]:
        return self.directory.nodes

    @nodes.setter
    def nodes(self, value: dict[int, NodeState]) -> None:
        self.directory.nodes = value

    def announce(self, grid: Grid) -> None:
        self.directory.announce(grid)

    def _discover(self, grid: Grid) -> None:
        self.directory.discover(grid)

    def _queries(self, nodes: list[int]) -> list[Message]:
        return self.directory.queries(nodes)

    def _sample(self, grid: Grid, exclude: set[int], count: int) -> list[int]:
        connected = set(grid.get_node_ids())
        usable = sorted((n for n in self.nodes if n in connected and n not in exclude), key=lambda n: self.nodes[n].key)
        k = min(count, len(usable))
        picked = self.rng.choice(len(usable), size=k, replace=False) if k else []
        return [usable[i] for i in sorted(picked)]

    # --- Strategy interface -----------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_started = utcnow()
        self._grid = grid
        self._discover(grid)
        self._sent_state = self.state
        self._pending = self.directory.take_refused(set(grid.get_node_ids()))
        sampled = self._sample(grid, exclude=set(), count=self.clients_per_round)
        if len(sampled) < self.min_clients:
            raise InsufficientReplies(
                f"round {server_round}: only {len(sampled)} usable nodes connected; min-clients is {self.min_clients}"
            )
        log(INFO, "configure_train: %d of %d nodes sampled", len(sampled), len(self.nodes))
        return self._messages(server_round, sampled)

    def _messages(self, server_round: int, nodes: list[int]) -> list[Message]:
        messages = []
        for node in nodes:
            content = self._payload(server_round, node)
            reason = f"no reply before the round deadline ({self.round_timeout:.0f} s)"
            self._pending[node] = ClientOutcome(node, "failed", reason, rank=self.nodes[node].rank,
                                                bytes_down=record_bytes(content))
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        return messages

    def _payload(self, server_round: int, node: int) -> RecordDict:
        known = self.nodes[node]
        client = ClientInfo(node_id=known.key, rank=known.rank, alpha=known.alpha)
        down = self.aggregator.downlink(self.state, client)
        self._uplinks[node] = down.uploads(self.aggregator.uplink)  # may change by round (RoLoRA)
        frozen_hash = tensors_hash(down.frozen) if down.frozen else ""
        settings = {
            **self.train_config,
            "server-round": server_round,
            "rank": known.rank,
            "alpha": known.alpha,
            "adapter-kind": self.aggregator.adapter_kind,
            "trainable": ",".join(sorted(down.trainable)),
            "uplink": ",".join(sorted(self._uplinks[node])),
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
        updates = self._collect(replies)
        attempts = 1
        while len(updates) < self.min_clients and attempts <= self.round_retries and self._grid is not None:
            extra = self._sample(self._grid, exclude=set(self._pending), count=self.min_clients - len(updates))
            log(WARNING, "round %d: %d usable replies < min-clients %d; retry %d with %d more nodes",
                server_round, len(updates), self.min_clients, attempts, len(extra))
            attempts += 1
            if not extra:
                break
            more = self._grid.send_and_receive(self._messages(server_round, extra), timeout=self.round_timeout)
            updates += self._collect(more)
        # ClientUpdate.node_id is the node's stable key (Flower ids change every run)
        flower_id = {self.nodes[n].key: n for n in self._pending if n in self.nodes}
        for key, reason in norm_outliers(updates, self.limits).items():
            node = flower_id[key]
            self._pending[node] = self._replace(self._pending[node], status="rejected", reason=reason)
        updates = [u for u in updates if self._pending[flower_id[u.node_id]].status == "ok"]
        # Replies arrive in any order; aggregate in node-key order so that the float
        # sums (and FLoRA's stacking order) are the same in every run of this seed.
        updates.sort(key=lambda u: u.node_id)

        start = time.perf_counter()
        aggregated, rel_err, loss = False, None, None
        if len(updates) >= self.min_clients:
            with math_limits(self.aggregator):  # the diagnostic's QRs too, not only the method's math
                result = self.aggregator.aggregate(self._sent_state, updates)
                rel_err = relative_error(self.aggregator, self._sent_state, result, updates)
            self.state = result.state
            if result.base_update:
                self.merge_log.append((server_round, result.base_update))
            aggregated = True
            weights = np.array([u.num_examples for u in updates], float)
            loss = float(np.dot(weights / weights.sum(), [u.metrics["train-loss"] for u in updates]))
        self.last_report = RoundReport(
            number=server_round, started_at=self._round_started, finished_at=utcnow(),
            outcomes=tuple(self._pending[n] for n in sorted(self._pending)), aggregated=aggregated,
            train_loss=loss, relative_error=rel_err, aggregate_seconds=time.perf_counter() - start, attempts=attempts,
        )
        if not aggregated:
            message = (f"round {server_round}: {len(updates)} usable replies < min-clients {self.min_clients} "
                       f"after {attempts - 1} retries")
            if self.on_insufficient == "stop":
                raise InsufficientReplies(message)
            log(WARNING, "%s; global state unchanged (on-insufficient=skip)", message)
        metrics: dict[str, float] = {"num-aggregated": len(updates)}
        if loss is not None:
            metrics["train-loss"] = loss
        if rel_err is not None:
            metrics["relative-error"] = rel_err
        return ArrayRecord(), MetricRecord(metrics)

    @staticmethod
    def _replace(outcome: ClientOutcome, **changes: Any) -> ClientOutcome:
        return ClientOutcome(**{**outcome.__dict__, **changes})

    def _collect(self, replies: Iterable[Message]) -> list[ClientUpdate]:
        updates = []
        for reply in replies:
            node = reply.metadata.src_node_id
            sent = self._pending.get(node)
            if sent is None or node not in self.nodes:
                continue  # a reply we did not ask for this round
            known = self.nodes[node]
            read = read_reply(node=node, reply=reply, bytes_down=sent.bytes_down, known=known, spec=self.spec,
                              aggregator=self.aggregator, limits=self.limits, uplink=self._uplinks.get(node))
            if read.beliefs is not None:  # the node's own word on what it holds corrects ours
                known.merged_through, known.frozen_hash = read.beliefs.merged_through, read.beliefs.frozen_hash
            self._pending[node] = read.outcome
            if read.update is not None:
                updates.append(read.update)
        return updates

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation (``fraction-evaluate`` > 0; the server's own runs in evaluate_fn)."""
        self.last_evaluation = None
        connected = set(grid.get_node_ids())
        usable = sorted((n for n in self.nodes if n in connected), key=lambda n: self.nodes[n].key)
        picked = fed_eval.pick(usable, fraction=self.fraction_evaluate, seed=self.spec.seed,
                               server_round=server_round)
        messages = fed_eval.evaluation_messages(
            server_round=server_round, nodes={n: self.nodes[n] for n in picked}, merge_log=self.merge_log,
            global_delta=self.aggregator.global_delta(self.state) if picked else {},
            max_seq_len=int(self.train_config["max-seq-len"]))
        self._evaluating = {m.metadata.dst_node_id: fed_eval.bytes_of(m) for m in messages}
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if not self._evaluating:
            return None
        evaluation = fed_eval.collect(replies, sent=self._evaluating, server_round=server_round,
                                      keys={n: self.nodes[n].key for n in self._evaluating})
        for row in evaluation.nodes:  # an evaluation reply also says which base updates the node holds
            if row.merged_through is not None:
                self.nodes[row.node_id].merged_through = row.merged_through
        self._evaluating = {}
        self.last_evaluation = evaluation
        if evaluation.loss is None:
            return None
        return MetricRecord({"federated-eval-loss": evaluation.loss, "federated-eval-perplexity": evaluation.perplexity,
                             "federated-eval-nodes": len(evaluation.ok)})

    def summary(self) -> None:
        log(INFO, "\t├── Aggregator: %s", getattr(self.aggregator, "name", type(self.aggregator).__name__))
        log(INFO, "\t├── Clients per round: %d (min %d)", self.clients_per_round, self.min_clients)
        log(INFO, "\t└── Adapted modules: %d, max rank %d", len(self.spec.modules), self.spec.max_rank)

    # --- checkpoints ------------------------------------------------------------------------

    def restore(self, *, state: Any, merge_log: list[tuple[int, Tensors]], rng_state: dict[str, Any]) -> None:
        """Continue from a checkpoint. Node beliefs start empty: nodes are new processes."""
        self.state = state
        self.merge_log = list(merge_log)
        self.rng.bit_generator.state = rng_state
        self.nodes = {}

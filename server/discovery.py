"""Which nodes exist and what they say about themselves: the rank query.

Nodes are known by what they say (a ``query`` message: rank, alpha, example count and a
stable node key), never by assumption. On a grid that can pull replies later
(``server.polling.PromptGrid``) the query goes out before round 0's evaluation
(``announce``) and its answers are collected when round 1 needs them, so round 1 does
not pay a whole extra round trip; a node that connects later is asked then.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from aggregation.base import check_rank
from server.polling import PromptGrid
from server.rounds import ClientOutcome, NodeState

__all__ = ["NodeDirectory"]


class NodeDirectory:
    def __init__(self, *, max_rank: int, query_timeout: float) -> None:
        self.max_rank = max_rank
        self.query_timeout = query_timeout
        self.nodes: dict[int, NodeState] = {}
        self.refused: dict[int, ClientOutcome] = {}
        self._announced: tuple[set[str], list[int]] | None = None  # rank queries sent early: ids, nodes

    def take_refused(self, connected: set[int]) -> dict[int, ClientOutcome]:
        """Nodes refused since the last round (reported once; they are asked again next round)."""
        refused, self.refused = {n: o for n, o in self.refused.items() if n in connected}, {}
        return refused

    def _unknown(self, grid: Grid) -> list[int]:
        asked = set(self._announced[1]) if self._announced else set()
        return [n for n in sorted(grid.get_node_ids()) if n not in self.nodes and n not in self.refused
                and n not in asked]

    def queries(self, nodes: list[int]) -> list[Message]:
        return [Message(RecordDict({"config": ConfigRecord({"max-rank": self.max_rank})}),
                        dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]

    def announce(self, grid: Grid) -> None:
        """Send the rank query to every connected node now and collect the answers in round 1.

        Only on a grid that can pull replies later (``server.polling.PromptGrid``): the
        answers then arrive while round 0 is evaluated instead of costing round 1 a
        whole extra round trip.
        """
        if not isinstance(grid, PromptGrid):
            return
        nodes = self._unknown(grid)
        if nodes:
            self._announced = (set(grid.push_messages(self.queries(nodes))), nodes)

    def discover(self, grid: Grid) -> None:
        """Ask every connected node we have not heard from for its rank and key."""
        if self._announced and isinstance(grid, PromptGrid):
            ids, asked = self._announced
            self._learn(grid.receive(ids, timeout=self.query_timeout), asked)
        self._announced = None
        unknown = self._unknown(grid)
        if unknown:
            self._learn(grid.send_and_receive(self.queries(unknown), timeout=self.query_timeout), unknown)

    def _learn(self, replies: Iterable[Message], asked: list[int]) -> None:
        answered = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            try:
                self.nodes[node] = self._node_from_query(reply)
            except (KeyError, TypeError, ValueError) as exc:
                self.refused[node] = ClientOutcome(node, "rejected", str(exc))
        for node in set(asked) - answered:
            log(WARNING, "node %s did not answer the rank query", node)

    def _node_from_query(self, reply: Message) -> NodeState:
        if reply.has_error():
            raise ValueError(f"query failed: {reply.error.reason}")
        info = reply.content["info"]
        rank, alpha = int(info["rank"]), float(info["alpha"])
        check_rank(rank, self.max_rank)
        key = str(reply.content["identity"]["node-key"]) if "identity" in reply.content.config_records else ""
        key = key or str(reply.metadata.src_node_id)
        holder = next((n for n, s in self.nodes.items() if s.key == key and n != reply.metadata.src_node_id), None)
        if holder is not None:
            raise ValueError(f"node key {key!r} is already used by node {holder}; node keys must be unique")
        return NodeState(key=key, rank=rank, alpha=alpha,
                         num_examples=int(info["num-examples"]))

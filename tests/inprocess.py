"""The real ServerApp and ClientApp in one process: a run without Flower's engines.

``run(**settings)`` calls ``server.app.main`` with a grid whose nodes are
``client.app.app`` (the ClientApp Flower loads), each with its own persistent
``Context`` and ``partition-id`` as the simulation engine gives it. Every message
crosses a real wire copy (Flower's protobuf serde, both ways), so neither side can
share an object with the other; a ClientApp that raises becomes Flower's ``Error``
reply, as the engines send it. What this leaves out is the engines themselves
(processes, Ray, gRPC, the SuperLink's state), which tests/integration covers; what it
keeps is everything fedlora wrote, for a run's worth of rounds in seconds.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid

from core.config import RunConfig
from server.local_grid import task_identity


def _wire(msg: Message) -> Message:
    return message_from_proto(message_to_proto(msg))


class InProcessGrid(Grid):
    """Delivers each pushed message to its node's ClientApp at once; ``pull`` hands back the replies."""

    def __init__(self, *, contexts: dict[int, Context]) -> None:
        from client.app import app  # what Flower loads as ``client.app:app``

        self.app = app
        self.contexts = contexts
        self.replies: dict[str, Message] = {}
        self.delivered: list[Message] = []  # every message a node received, in order

    # --- the parts of Flower's Grid a ServerApp uses ---------------------------------------

    def set_run(self, run) -> None:  # type: ignore[override]
        self._run = run

    @property
    def run(self):  # type: ignore[override]
        return getattr(self, "_run", None)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def get_nodes(self):  # type: ignore[override]
        return []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids do on push
            ids.append(msg.metadata.message_id)
            self.replies[msg.metadata.message_id] = self._deliver(_wire(msg))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [_wire(self.replies.pop(i)) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        self.delivered.append(msg)
        try:
            reply = self.app(msg, self.contexts[node])
        except Exception as exc:  # what the engines answer for a ClientApp that raised
            reply = Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
        reply.metadata._src_node_id = node  # what the engine sets on delivery
        return reply


def node_contexts(run_config: dict[str, Any], num_nodes: int, node_configs: dict[int, dict] | None = None
                  ) -> dict[int, Context]:
    """One persistent context per simulated node, ids 1..n, partition ids 0..n-1."""
    node_configs = node_configs or {}
    return {n: Context(run_id=1, node_id=n, state=RecordDict(), run_config=dict(run_config),
                       node_config={"partition-id": n - 1, "num-partitions": num_nodes, **node_configs.get(n, {})})
            for n in range(1, num_nodes + 1)}


def run(*, num_nodes: int, node_configs: dict[int, dict] | None = None, **settings: Any) -> InProcessGrid:
    """One run of ``server.app.main`` over ``num_nodes`` in-process nodes; the grid, for inspection."""
    from server.app import main

    task_identity()
    run_config = RunConfig(simulation_nodes=num_nodes, **settings).to_flower()
    grid = InProcessGrid(contexts=node_contexts(run_config, num_nodes, node_configs))
    main(grid, Context(run_id=1, node_id=0, state=RecordDict(), run_config=run_config, node_config={}))
    return grid

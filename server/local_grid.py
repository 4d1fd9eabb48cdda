"""An in-memory Grid whose nodes are plain functions: the strategy without a Flower engine.

It only routes messages (the strategy tests and the wire-format benchmark use it); the
real Flower engines are exercised in tests/integration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict


class FakeGrid:
    def __init__(self, ranks: dict[int, int], alpha: float = 16.0, examples: dict[int, int] | None = None) -> None:
        self.ranks = ranks
        self.alpha = alpha
        self.examples = examples or {n: 10 for n in ranks}
        self.sent: list[Message] = []
        self.train_reply: Callable[[int, Message], Message] | None = None  # for retried rounds

    def get_node_ids(self) -> Iterable[int]:
        return list(self.ranks)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if msg.metadata.message_type != "query":
                replies.append(self.train_reply(node, msg)) if self.train_reply else None
                continue
            info = MetricRecord({"rank": self.ranks[node], "alpha": self.alpha, "num-examples": self.examples[node]})
            identity = ConfigRecord({"node-key": f"node-{node:03d}"})
            replies.append(reply_from(node, RecordDict({"info": info, "identity": identity}), msg))
        return replies


def task_identity() -> None:
    """Messages can only be built inside a task; give this test process one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1


def reply_from(node: int, content: RecordDict, msg: Message) -> Message:
    reply = Message(content, dst_node_id=0, message_type=msg.metadata.message_type)
    reply.metadata._src_node_id = node  # what the engine sets on delivery
    return reply


Trainer = Callable[[int, Message], RecordDict]

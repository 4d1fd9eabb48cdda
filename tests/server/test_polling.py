"""PromptGrid: Flower's grid with a short pull loop, and the rank query sent before round 1."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

import aggregation
from aggregation import ModelSpec, ModuleShape
from server.local_grid import FakeGrid, task_identity
from server.polling import PromptGrid, prompt
from server.strategy import LoraStrategy


@pytest.fixture(autouse=True)
def _identity():
    task_identity()


class SlowGrid(Grid):
    """A Grid over FakeGrid's nodes whose replies become pullable only after ``lag`` pulls."""

    def __init__(self, ranks: dict[int, int], lag: int = 3) -> None:
        self.fake = FakeGrid(ranks)
        self.lag = lag
        self.pushed: list[Message] = []
        self.ready: dict[str, tuple[int, Message]] = {}
        self.pull_calls = 0

    def set_run(self, run) -> None: ...

    @property
    def run(self): ...

    def create_message(self, *args, **kwargs): ...

    def get_node_ids(self):
        return self.fake.get_node_ids()

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            mid = f"m{len(self.pushed)}"
            msg.metadata.__dict__["_message_id"] = mid
            self.pushed.append(msg)
            (reply,) = self.fake.send_and_receive([msg])
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            self.ready[mid] = (self.pull_calls + self.lag, reply)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        self.pull_calls += 1
        out = [r for mid, (at, r) in self.ready.items() if mid in set(message_ids) and at <= self.pull_calls]
        return out

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("PromptGrid must not call Flower's 3-second loop")


SHAPES = {"l0.q": ModuleShape(8, 6)}


def _strategy() -> LoraStrategy:
    return LoraStrategy(aggregator=aggregation.create("fedavg"), spec=ModelSpec(modules=SHAPES, max_rank=8),
                        train_config={"local-steps": 1, "batch-size": 2, "learning-rate": 0.01, "max-seq-len": 16},
                        clients_per_round=2, min_clients=1)


def test_replies_are_pulled_until_all_arrive_without_flowers_loop():
    inner = SlowGrid({1: 4, 2: 8}, lag=4)
    grid = PromptGrid(inner=inner, first_interval=0.001, max_interval=0.002)
    strategy = _strategy()
    strategy._discover(grid)
    assert {s.rank for s in strategy.nodes.values()} == {4, 8}
    assert inner.pull_calls == 4  # pulled until the replies were there, then stopped


def test_a_pull_loop_gives_up_at_its_timeout():
    inner = SlowGrid({1: 4}, lag=10**9)
    grid = PromptGrid(inner=inner, first_interval=0.001, max_interval=0.01)
    assert grid.send_and_receive(list(_strategy()._queries([1])), timeout=0.05) == []


def test_the_rank_query_goes_out_before_round_1_and_round_1_sends_no_second_one():
    inner = SlowGrid({1: 4, 2: 8}, lag=1)
    grid = prompt(inner)
    assert prompt(grid) is grid
    strategy = _strategy()
    strategy.announce(grid)
    assert [m.metadata.message_type for m in inner.pushed] == ["query", "query"]
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    assert [m.metadata.message_type for m in inner.pushed] == ["query", "query"]  # answers collected, none resent
    assert len(messages) == 2 and {s.rank for s in strategy.nodes.values()} == {4, 8}


def test_intervals_are_checked():
    with pytest.raises(ValueError, match="first_interval"):
        PromptGrid(inner=SlowGrid({1: 4}), first_interval=1.0, max_interval=0.5)

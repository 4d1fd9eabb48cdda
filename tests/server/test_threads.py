"""The server's thread limit is in force where it does its math, and nowhere else.

A probe aggregator reads ``threadpoolctl.threadpool_info()`` from inside the aggregation
path; the client's training, run in the same process through the real handler, reads it
too. The whole test runs with the pools set to 3 threads first, so "limited to 1" and "left
alone" are different numbers on any machine (a pool first loaded later keeps its default,
which is never 1 on a machine where limiting matters).
"""

from __future__ import annotations

import threading

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from threadpoolctl import threadpool_info, threadpool_limits

import aggregation
import client.handlers as client_app
import server.strategy as strategy_module
from core.config import RunConfig
from privacy.central import CentralDP
from server.app import TRAIN_KEYS, make_aggregator, model_spec
from server.local_grid import FakeGrid, task_identity
from server.strategy import LoraStrategy
from server.threads import ThreadLimited, server_math
from tests.privacy.helpers import tiny

OUTSIDE = 3


def pools() -> set[int]:
    """Thread counts of the BLAS pools (what the server's numpy math runs in)."""
    return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}


class Probe:
    """FedAvg, noting the pools' thread counts in every method it is asked to run."""

    def __init__(self) -> None:
        self.inner = aggregation.create("fedavg")
        self.name, self.uplink, self.adapter_kind = "fedavg", self.inner.uplink, self.inner.adapter_kind
        self.weighted_sum, self.accepts_calibration = self.inner.weighted_sum, False
        self.seen: dict[str, set[int]] = {}

    def _note(self, method: str) -> None:
        self.seen.setdefault(method, set()).update(pools())

    def init_state(self, spec):
        self._note("init_state")
        return self.inner.init_state(spec)

    def downlink(self, state, client):
        self._note("downlink")
        return self.inner.downlink(state, client)

    def aggregate(self, state, updates):
        self._note("aggregate")
        return self.inner.aggregate(state, updates)

    def global_delta(self, state):
        self._note("global_delta")
        return self.inner.global_delta(state)

    def client_delta(self, state, update):
        self._note("client_delta")
        return self.inner.client_delta(state, update)


@pytest.fixture(autouse=True)
def _pools_at_three():
    task_identity()
    if not pools():
        pytest.skip("no BLAS pool loaded that threadpoolctl can limit")
    with threadpool_limits(limits=OUTSIDE):
        assert pools() == {OUTSIDE}
        yield


def test_a_federated_round_limits_the_server_math_and_not_the_clients_training(tmp_path, monkeypatch):
    cfg = RunConfig(model="tiny", ranks="4", max_rank=8, batch_size=2, local_steps=1, max_seq_len=32, server_threads=1)
    run_config = cfg.to_flower()
    seen_training: set[int] = set()
    seen_diagnostic: set[int] = set()
    real_train, real_error = client_app.train, strategy_module.relative_error

    def train(*args, **kwargs):
        seen_training.update(pools())
        return real_train(*args, **kwargs)

    def relative_error(*args, **kwargs):
        seen_diagnostic.update(pools())
        return real_error(*args, **kwargs)

    monkeypatch.setattr(client_app, "train", train)
    monkeypatch.setattr(strategy_module, "relative_error", relative_error)
    probe = Probe()
    strategy = LoraStrategy(aggregator=ThreadLimited(inner=probe, threads=cfg.server_threads),
                            spec=model_spec(cfg, tiny().model), train_config={k: run_config[k] for k in TRAIN_KEYS},
                            clients_per_round=2, min_clients=2)
    contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": n - 1, "num-partitions": 2},
                           state=RecordDict(), run_config=run_config) for n in (1, 2)}
    grid = FakeGrid({1: 4, 2: 4})
    grid.train_reply = lambda node, msg: client_app.train_handler(msg, contexts[node])
    replies = grid.send_and_receive(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    strategy.aggregate_train(1, replies)
    strategy.aggregator.global_delta(strategy.state)

    assert strategy.last_report.aggregated
    assert set(probe.seen) == {"init_state", "downlink", "aggregate", "client_delta", "global_delta"}
    assert all(seen == {1} for seen in probe.seen.values()), probe.seen
    assert seen_diagnostic == {1}  # the strategy's relative-error diagnostic runs under the limit too
    # the clients' training never sees the server's limit (a pool loaded during training keeps its
    # own default, which is why this is not simply {OUTSIDE})
    assert seen_training and 1 not in seen_training and OUTSIDE in seen_training
    assert 1 not in pools()


def test_make_aggregator_applies_the_limit_under_central_dp_and_zero_turns_it_off():
    limited = make_aggregator(RunConfig(aggregator="ffa-lora", server_threads=2), None)
    assert isinstance(limited, ThreadLimited) and limited.threads == 2 and limited.name == "ffa-lora"
    assert not isinstance(make_aggregator(RunConfig(aggregator="ffa-lora", server_threads=0), None), ThreadLimited)
    central = make_aggregator(RunConfig(aggregator="ffa-lora", dp_central_clip=0.1, dp_central_noise=1.0), None)
    assert isinstance(central, CentralDP) and isinstance(central.inner, ThreadLimited)


def test_nested_blocks_and_another_threads_block_leave_the_outermost_limit_in_force_until_it_ends():
    inside: list[set[int]] = []

    def other() -> None:  # e.g. an evaluation thread: its block neither lifts nor resets ours
        with server_math(1):
            inside.append(pools())

    with server_math(1):
        with server_math(1):
            inside.append(pools())
        inside.append(pools())  # the nested block ended: the outer one is still in force
        worker = threading.Thread(target=other)
        worker.start()
        worker.join(10)
        inside.append(pools())
    assert inside == [{1}, {1}, {1}, {1}]
    assert pools() == {OUTSIDE}
    with pytest.raises(ValueError, match="server-threads"):
        with server_math(-1):
            pass

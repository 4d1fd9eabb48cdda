"""Federated evaluation, the server's side: who is asked, what they get, what their replies add up to."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

import aggregation
from aggregation import ModelSpec, ModuleShape
from core.wire import record_to_merges, record_to_tensors
from server import federated_eval as fe
from server.local_grid import FakeGrid, reply_from, task_identity
from server.rounds import NodeState
from server.strategy import LoraStrategy

SHAPES = {"l0.q": ModuleShape(8, 6)}
TRAIN = {"local-steps": 1, "batch-size": 2, "learning-rate": 0.01, "max-seq-len": 16}


@pytest.fixture(autouse=True)
def _identity():
    task_identity()


def _factors(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"l0.q": {"B": rng.normal(size=(8, 2)), "A": rng.normal(size=(2, 6))}}


def _asked(nodes: dict[int, int]) -> dict[int, Message]:
    """node -> the evaluation message it was sent (``nodes``: node -> merged_through)."""
    states = {n: NodeState(key=f"node-{n:03d}", rank=4, alpha=16.0, num_examples=10, merged_through=m)
              for n, m in nodes.items()}
    messages = fe.evaluation_messages(server_round=3, nodes=states, global_delta=_factors(0),
                                      merge_log=[(1, _factors(1)), (2, _factors(2))], max_seq_len=16)
    return {m.metadata.dst_node_id: m for m in messages}


def _ok(msg: Message, *, loss: float, examples: int, **extra) -> Message:
    metrics = {"eval-loss": loss, "eval-perplexity": math.exp(loss), "eval-tokens": 10 * examples,
               "num-examples": examples, "eval-seconds": 0.5, "merged-through": 2, **extra}
    content = RecordDict({"status": ConfigRecord({"status": "ok", "reason": "", "frozen-hash": ""}),
                          "metrics": MetricRecord(metrics), "update": ArrayRecord()})
    return reply_from(msg.metadata.dst_node_id, content, msg)


def _status(msg: Message, status: str, reason: str, **metrics) -> Message:
    content = RecordDict({"status": ConfigRecord({"status": status, "reason": reason, "frozen-hash": ""}),
                          "metrics": MetricRecord(metrics), "update": ArrayRecord()})
    return reply_from(msg.metadata.dst_node_id, content, msg)


def _collect(asked: dict[int, Message], replies: list[Message]) -> fe.RoundEvaluation:
    return fe.collect(replies, sent={n: 100 + n for n in asked}, keys={n: f"node-{n:03d}" for n in asked},
                      server_round=3)


# --- who is asked -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(count=st.integers(1, 60), fraction=st.floats(0.001, 1.0), seed=st.integers(0, 2**31), number=st.integers(1, 99))
def test_pick_asks_the_fraction_at_least_one_and_the_same_nodes_for_the_same_seed_and_round(
        count, fraction, seed, number):
    nodes = [100 + 7 * i for i in range(count)]
    picked = fe.pick(nodes, fraction=fraction, seed=seed, server_round=number)
    assert picked == fe.pick(list(nodes), fraction=fraction, seed=seed, server_round=number)
    assert len(set(picked)) == len(picked) and set(picked) <= set(nodes) and picked == sorted(picked)
    exact = fraction * count
    assert len(picked) == max(1, round(exact) if math.isclose(exact, round(exact)) else math.ceil(exact))


def test_pick_rounds_a_whole_share_to_itself_not_up():
    nodes = list(range(100))
    assert len(fe.pick(nodes, fraction=0.07, seed=0, server_round=1)) == 7  # 0.07 x 100 is 7.000000000000001
    assert len(fe.pick(nodes, fraction=0.071, seed=0, server_round=1)) == 8


def test_pick_varies_with_the_round_and_asks_nobody_when_off():
    nodes = list(range(20))
    assert len({tuple(fe.pick(nodes, fraction=0.25, seed=3, server_round=r)) for r in range(1, 11)}) > 1
    assert fe.pick(nodes, fraction=0.0, seed=3, server_round=1) == []
    assert fe.pick([], fraction=1.0, seed=3, server_round=1) == []
    assert fe.pick(nodes, fraction=1.0, seed=3, server_round=1) == nodes


def test_each_node_gets_the_global_adapter_and_only_the_base_updates_it_lacks():
    asked = _asked({11: 0, 12: 1, 13: 2})
    for node, missing in ((11, [1, 2]), (12, [2]), (13, [])):
        msg = asked[node]
        assert msg.metadata.message_type == MessageType.EVALUATE
        assert sorted(record_to_merges(msg.content["merges"])) == missing
        assert list(msg.content["config"]["merge-rounds"]) == [1, 2]
        assert int(msg.content["config"]["server-round"]) == 3
        np.testing.assert_array_equal(record_to_tensors(msg.content["global"])["l0.q"]["A"],
                                      _factors(0)["l0.q"]["A"].astype(np.float32))  # the wire's float32


# --- what they said ---------------------------------------------------------------------------


def test_a_node_that_never_answers_is_failed_with_the_reason_and_the_others_count():
    asked = _asked({11: 2, 12: 2, 13: 2})
    stranger = _ok(_asked({99: 2})[99], loss=0.1, examples=1000)  # a reply nobody asked for
    evaluation = _collect(asked, [_ok(asked[11], loss=2.0, examples=10), _ok(asked[13], loss=4.0, examples=30),
                                  stranger])
    assert [(n.node_id, n.status) for n in evaluation.nodes] == [(11, "ok"), (12, "failed"), (13, "ok")]
    (missing,) = [n for n in evaluation.nodes if n.node_id == 12]
    assert missing.reason == "no evaluation reply before the deadline" and missing.bytes_down == 112
    assert evaluation.loss == pytest.approx((2.0 * 10 + 4.0 * 30) / 40)


@pytest.mark.parametrize("metrics, needle", [
    ({"eval-perplexity": 2.0, "eval-tokens": 9, "num-examples": 3, "eval-seconds": 1.0}, "'eval-loss'"),
    ({"eval-loss": float("nan"), "eval-perplexity": 2.0, "eval-tokens": 9, "num-examples": 3, "eval-seconds": 1.0},
     "not a finite loss"),
    ({"eval-loss": -0.5, "eval-perplexity": 0.6, "eval-tokens": 9, "num-examples": 3, "eval-seconds": 1.0},
     "eval-loss -0.5"),
    ({"eval-loss": 1.0, "eval-perplexity": 2.0, "eval-tokens": 9, "num-examples": 0, "eval-seconds": 1.0},
     "num-examples 0"),
    ({"eval-loss": 1.0, "eval-perplexity": 2.0, "eval-tokens": 9, "eval-seconds": 1.0}, "'num-examples'"),
])
def test_a_malformed_reply_is_failed_naming_what_is_wrong_and_never_weighs_the_aggregate(metrics, needle):
    asked = _asked({11: 2, 12: 2})
    evaluation = _collect(asked, [_ok(asked[11], loss=3.0, examples=5), _status(asked[12], "ok", "", **metrics)])
    bad = evaluation.nodes[1]
    assert bad.status == "failed" and bad.reason.startswith("malformed evaluation reply") and needle in bad.reason
    assert evaluation.loss == 3.0 and evaluation.spread() == {"worst": 3.0, "median": 3.0, "best": 3.0}


def test_an_error_reply_a_failed_node_and_a_resync_are_recorded_as_the_node_said():
    asked = _asked({11: 0, 12: 2, 13: 2})
    evaluation = _collect(asked, [
        _status(asked[11], "resync", "node lacks base updates [1]", **{"merged-through": 0}),
        Message(Error(code=2, reason="<class 'RuntimeError'>:<'CUDA out of memory'>"), reply_to=asked[12]),
        _status(asked[13], "failed", "node-3 has 1 example(s): too few to hold one out"),
    ])
    by_node = {n.node_id: n for n in evaluation.nodes}
    assert by_node[11].status == "resync" and by_node[11].merged_through == 0
    assert by_node[12].status == "failed" and "CUDA out of memory" in by_node[12].reason
    assert by_node[13].status == "failed" and "too few" in by_node[13].reason
    assert evaluation.ok == [] and evaluation.loss is None and evaluation.perplexity is None
    assert evaluation.spread() == {}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 20.0), st.integers(1, 500)), min_size=1, max_size=12),
       st.integers(0, 3))
def test_the_aggregate_is_the_example_weighted_mean_and_the_spread_the_nodes_own_losses(rows, failed):
    nodes = {10 + i: 2 for i in range(len(rows) + failed)}
    asked = _asked(nodes)
    replies = [_ok(asked[10 + i], loss=loss, examples=n) for i, (loss, n) in enumerate(rows)]
    replies += [_status(asked[10 + len(rows) + j], "failed", "boom") for j in range(failed)]
    evaluation = _collect(asked, replies)
    losses = [loss for loss, _ in rows]
    weighted = sum(loss * n for loss, n in rows) / sum(n for _, n in rows)
    assert evaluation.loss == pytest.approx(weighted, rel=1e-12)
    assert evaluation.perplexity == pytest.approx(math.exp(weighted), rel=1e-12)
    assert evaluation.spread() == {"worst": max(losses), "median": statistics.median(losses), "best": min(losses)}
    assert min(losses) <= evaluation.loss * (1 + 1e-12) and evaluation.loss <= max(losses) * (1 + 1e-12)
    assert len(evaluation.ok) == len(rows) and len(evaluation.nodes) == len(rows) + failed


def test_a_huge_loss_counts_and_its_perplexity_is_capped_as_the_nodes_own_is():
    asked = _asked({11: 2, 12: 2})
    huge = {"eval-loss": 1000.0, "eval-perplexity": math.exp(50), "eval-tokens": 9, "num-examples": 1,
            "eval-seconds": 1.0}
    evaluation = _collect(asked, [_status(asked[11], "ok", "", **huge), _ok(asked[12], loss=1.0, examples=1)])
    assert evaluation.loss == 500.5 and evaluation.perplexity == math.exp(50.0)  # no OverflowError mid-run


def test_a_small_node_the_global_adapter_fails_is_the_worst_although_the_aggregate_looks_fine():
    asked = _asked({11: 2, 12: 2, 13: 2})
    evaluation = _collect(asked, [_ok(asked[11], loss=1.0, examples=500), _ok(asked[12], loss=1.1, examples=400),
                                  _ok(asked[13], loss=6.0, examples=5)])
    assert evaluation.loss < 1.1 and evaluation.spread()["worst"] == 6.0 and evaluation.spread()["median"] == 1.1


# --- through the strategy ---------------------------------------------------------------------


def test_the_strategy_asks_the_picked_nodes_and_learns_what_base_updates_each_holds():
    grid = FakeGrid({11: 4, 12: 4, 13: 4, 14: 4})
    strategy = LoraStrategy(aggregator=aggregation.create("flora"), spec=ModelSpec(modules=SHAPES, max_rank=8),
                            train_config=TRAIN, clients_per_round=4, min_clients=1, fraction_evaluate=0.5)
    strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)  # the rank query: the nodes are known
    strategy.merge_log = [(1, _factors(1))]
    messages = list(strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid))
    picked = sorted(m.metadata.dst_node_id for m in messages)
    keys = sorted(strategy.nodes, key=lambda n: strategy.nodes[n].key)
    assert picked == fe.pick(keys, fraction=0.5, seed=strategy.spec.seed, server_round=1) and len(picked) == 2
    first, second = picked
    sent = {m.metadata.dst_node_id: m for m in messages}
    replies = [_ok(sent[first], loss=2.0, examples=4, **{"merged-through": 1}),
               _status(sent[second], "resync", "node lacks base updates [1]", **{"merged-through": 0})]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["federated-eval-loss"] == 2.0 and metrics["federated-eval-nodes"] == 1
    assert strategy.nodes[first].merged_through == 1 and strategy.nodes[second].merged_through == 0
    assert {n.node_id: n.status for n in strategy.last_evaluation.nodes} == {first: "ok", second: "resync"}

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

import aggregation
from aggregation import ClientUpdate, ModelSpec, ModuleShape
from server.rounds import InsufficientReplies
from server.strategy import LoraStrategy
from server.validation import UpdateLimits, check_update
from core.wire import (
    PayloadError,
    record_bytes,
    record_to_merges,
    record_to_tensors,
    tensors_to_record,
)
from server.local_grid import FakeGrid, reply_from, task_identity

SHAPES = {"l0.q": ModuleShape(8, 6), "l1.q": ModuleShape(8, 6)}
TRAIN = {"local-steps": 1, "batch-size": 2, "learning-rate": 0.01, "max-seq-len": 16}


@pytest.fixture(autouse=True)
def _identity():
    task_identity()


def _strategy(name="fedavg", per_round=3, min_clients=1, **kwargs):
    return LoraStrategy(
        aggregator=aggregation.create(name), spec=ModelSpec(modules=SHAPES, max_rank=16, seed=0),
        train_config=TRAIN, clients_per_round=per_round, min_clients=min_clients, **kwargs,
    )


def _train_reply(msg, rng, *, poison=None, n=10):
    cfg = msg.content["config"]
    rank = int(cfg["rank"])
    up = set(str(cfg["uplink"]).split(","))
    tensors = {
        m: {k: v for k, v in {"A": rng.normal(size=(rank, s.d_in)), "B": rng.normal(size=(s.d_out, rank))}.items() if k in up}
        for m, s in SHAPES.items()
    }
    if poison == "nan":
        tensors["l0.q"]["A"][0, 0] = np.nan
    if poison == "shape":
        tensors["l0.q"]["A"] = np.zeros((rank + 1, 6))
    merged = max([r for r in cfg["merge-rounds"]] or [0])
    content = RecordDict({
        "update": tensors_to_record(tensors),
        "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0, "merged-through": merged}),
        "status": ConfigRecord({"status": "ok", "reason": "", "frozen-hash": str(cfg["frozen-hash"])}),
    })
    return reply_from(msg.metadata.dst_node_id, content, msg), tensors


def test_each_node_gets_its_own_payload_at_its_own_rank():
    grid = FakeGrid({11: 2, 12: 8, 13: 16})
    strategy = _strategy()
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    assert len({id(m.content) for m in messages}) == 3
    for msg in messages:
        rank = grid.ranks[msg.metadata.dst_node_id]
        assert int(msg.content["config"]["rank"]) == rank
        assert record_to_tensors(msg.content["adapter"])["l0.q"]["A"].shape == (rank, 6)
    messages[0].content["config"]["rank"] = 99  # editing one payload leaks nowhere
    assert [int(m.content["config"]["rank"]) for m in messages[1:]] == [8, 16]


def test_rank_is_learnt_from_the_node_and_out_of_range_is_rejected():
    grid = FakeGrid({1: 4, 2: 32})
    strategy = LoraStrategy(aggregator=aggregation.create("fedavg"), spec=ModelSpec(modules=SHAPES, max_rank=16),
                            train_config=TRAIN, clients_per_round=2, min_clients=1)
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    assert [m.metadata.dst_node_id for m in messages if m.metadata.message_type == "train"] == [1]
    rng = np.random.default_rng(0)
    strategy.aggregate_train(1, [_train_reply(messages[0], rng)[0]])
    outcome = {o.node_id: o for o in strategy.last_report.outcomes}[2]
    assert outcome.status == "rejected" and "rank 32" in outcome.reason


@pytest.mark.parametrize("status", ["failed", "declined"])
def test_a_failed_or_declined_reply_is_recorded_with_its_dp_metrics(status):
    """A DP node that could not train still reports the ε its ledger holds; the row must keep it."""
    grid = FakeGrid({1: 4})
    strategy = _strategy(per_round=1, on_insufficient="skip")
    (msg,) = strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)
    dp = {"dp-epsilon": 7.992, "dp-delta": 1e-5, "dp-steps": 2, "merged-through": 0}
    content = RecordDict({
        "metrics": MetricRecord(dp),
        "status": ConfigRecord({"status": status, "reason": "RuntimeError: broke mid-round", "frozen-hash": ""}),
        "update": ArrayRecord(),
    })
    strategy.aggregate_train(1, [reply_from(1, content, msg)])
    (outcome,) = strategy.last_report.outcomes
    assert (outcome.status, outcome.reason) == (status, "RuntimeError: broke mid-round")
    assert outcome.metrics == dp


def test_bad_replies_are_excluded_and_aggregate_equals_honest_only():
    grid = FakeGrid({1: 4, 2: 4, 3: 4, 4: 4})
    rng = np.random.default_rng(3)
    strategy = _strategy(per_round=4)
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    replies, honest = [], []
    for msg, poison in zip(msgs, [None, "nan", "shape", None]):
        reply, tensors = _train_reply(msg, rng, poison=poison)
        replies.append(reply)
        if poison is None:
            honest.append(ClientUpdate(node_id=str(msg.metadata.dst_node_id), num_examples=10, rank=4, alpha=16.0, tensors=tensors))
    start_state = strategy.state
    strategy.aggregate_train(1, replies)
    status = {o.node_id: (o.status, o.reason) for o in strategy.last_report.outcomes}
    assert status[2][0] == "rejected" and "NaN" in status[2][1]
    assert status[3][0] == "rejected" and "shape" in status[3][1]
    expected = aggregation.create("fedavg").aggregate(start_state, honest).state
    for m in SHAPES:
        np.testing.assert_allclose(strategy.state.factors[m]["B"], expected.factors[m]["B"], atol=1e-6)


def test_too_few_replies_with_skip_policy_leave_the_state_unchanged():
    grid = FakeGrid({1: 4, 2: 4})
    strategy = _strategy(per_round=2, min_clients=2, on_insufficient="skip")
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    before = strategy.state
    strategy.aggregate_train(1, [_train_reply(msgs[0], np.random.default_rng(0))[0]])
    assert strategy.state is before and not strategy.last_report.aggregated
    reasons = {o.node_id: o.reason for o in strategy.last_report.outcomes}
    assert "deadline" in reasons[2]  # the silent node is recorded as a straggler


def test_too_few_replies_with_stop_policy_stops_the_run_clearly():
    grid = FakeGrid({1: 4, 2: 4})
    strategy = _strategy(per_round=2, min_clients=2)
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    with pytest.raises(InsufficientReplies, match="1 usable replies < min-clients 2"):
        strategy.aggregate_train(1, [_train_reply(msgs[0], np.random.default_rng(0))[0]])


def test_retry_samples_other_nodes_and_completes_the_round():
    grid = FakeGrid({1: 4, 2: 4, 3: 4})
    rng = np.random.default_rng(0)
    grid.train_reply = lambda node, msg: _train_reply(msg, rng)[0]
    strategy = _strategy(per_round=2, min_clients=2)
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    strategy.aggregate_train(1, [_train_reply(msgs[0], rng)[0]])  # the second sampled node never answers
    report = strategy.last_report
    assert report.aggregated and report.attempts == 2 and report.num_ok == 2
    assert len(report.outcomes) == 3


def test_huge_norm_update_is_excluded_by_the_median_rule():
    grid = FakeGrid({1: 4, 2: 4, 3: 4, 4: 4})
    rng = np.random.default_rng(1)
    strategy = _strategy(per_round=4, limits=UpdateLimits(max_norm_ratio=10.0))
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    replies = []
    for i, msg in enumerate(msgs):
        reply, tensors = _train_reply(msg, rng)
        if i == 0:  # scale the first update by 1000
            tensors = {m: {k: 1000 * v for k, v in f.items()} for m, f in tensors.items()}
            reply.content["update"] = tensors_to_record(tensors)
        replies.append(reply)
    strategy.aggregate_train(1, replies)
    outcome = {o.node_id: o for o in strategy.last_report.outcomes}[msgs[0].metadata.dst_node_id]
    assert outcome.status == "rejected" and "median" in outcome.reason
    assert strategy.last_report.num_ok == 3


def test_oversized_payload_is_rejected():
    grid = FakeGrid({1: 4})
    strategy = LoraStrategy(aggregator=aggregation.create("fedavg"), spec=ModelSpec(modules=SHAPES, max_rank=16),
                            train_config=TRAIN, clients_per_round=1, min_clients=1, on_insufficient="skip",
                            limits=UpdateLimits(max_payload_bytes=100))
    (msg,) = strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)
    strategy.aggregate_train(1, [_train_reply(msg, np.random.default_rng(0))[0]])
    (outcome,) = strategy.last_report.outcomes
    assert outcome.status == "rejected" and "exceeds the limit of 100 bytes" in outcome.reason


def test_sampling_follows_node_keys_not_flower_ids():
    """Two runs whose nodes got different Flower ids sample the same node keys."""
    picks = []
    for ids in ([10, 20, 30, 40, 50], [99, 7, 1234, 5, 42]):
        grid = FakeGrid({n: 4 for n in ids})
        strategy = _strategy(per_round=2)
        # give node keys by position, as partition ids would
        order = {n: f"partition-{i}" for i, n in enumerate(ids)}
        strategy._discover(grid)
        for n in ids:
            strategy.nodes[n].key = order[n]
        picked = strategy._sample(grid, exclude=set(), count=2)
        picks.append(sorted(strategy.nodes[n].key for n in picked))
    assert picks[0] == picks[1]


def test_node_that_missed_rounds_is_sent_exactly_the_base_updates_it_lacks():
    """FLoRA folds a stack into the base every round; a late node gets all it missed."""
    grid = FakeGrid({1: 4, 2: 8})
    strategy = _strategy("flora", per_round=2)
    rng = np.random.default_rng(0)
    for rnd in (1, 2, 3):
        # node 2 sits out rounds 2 and 3 (simulated by not replying; the server keeps its belief)
        msgs = list(strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid))
        replies = [_train_reply(m, rng)[0] for m in msgs if rnd == 1 or m.metadata.dst_node_id == 1]
        strategy.aggregate_train(rnd, replies)
    msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(4, ArrayRecord(), ConfigRecord(), grid)}
    assert sorted(record_to_merges(msgs[1].content["merges"])) == [3]
    # round r's stack exists only after round r: node 2 trained in round 1 only
    assert sorted(record_to_merges(msgs[2].content["merges"])) == [1, 2, 3]
    assert list(msgs[2].content["config"]["merge-rounds"]) == [1, 2, 3]


def test_check_update_names_the_problem():
    spec = ModelSpec(modules=SHAPES, max_rank=16)
    agg = aggregation.create("fedavg")
    good = {m: {"A": np.zeros((4, 6)), "B": np.zeros((8, 4))} for m in SHAPES}
    check_update(good, spec, agg, 4)
    with pytest.raises(PayloadError, match="missing"):
        check_update({"l0.q": good["l0.q"]}, spec, agg, 4)
    with pytest.raises(PayloadError, match="R"):
        check_update({m: {**f, "R": np.zeros((4, 4))} for m, f in good.items()}, spec, agg, 4)
    with pytest.raises(PayloadError, match="rank 2"):
        check_update(good, spec, agg, 2)
    inf = {m: {k: v.copy() for k, v in f.items()} for m, f in good.items()}
    inf["l1.q"]["B"][0, 0] = np.inf
    with pytest.raises(PayloadError, match="l1.q.B"):
        check_update(inf, spec, agg, 4)


def test_a_per_round_uplink_is_sent_checked_and_counted():
    """RoLoRA asks for B, then A: the payload says so, a reply with the other factor is
    rejected, and the bytes up are those of the one factor each node sent."""
    grid = FakeGrid({1: 4, 2: 4})
    strategy = _strategy("rolora", per_round=2)
    rng = np.random.default_rng(0)
    for rnd, factor in ((1, "B"), (2, "A"), (3, "B")):
        msgs = list(strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid))
        assert {str(m.content["config"]["uplink"]) for m in msgs} == {factor}
        assert {str(m.content["config"]["trainable"]) for m in msgs} == {factor}
        honest, sent = _train_reply(msgs[0], rng)
        wrong, _ = _train_reply(msgs[1], rng)
        both = {m: {"A": np.zeros((4, s.d_in)), "B": np.zeros((s.d_out, 4))} for m, s in SHAPES.items()}
        wrong.content["update"] = tensors_to_record(both)  # the class's union, not this round's factor
        strategy.aggregate_train(rnd, [honest, wrong])
        outcomes = {o.node_id: o for o in strategy.last_report.outcomes}
        assert outcomes[2].status == "rejected" and f"expected ['{factor}']" in outcomes[2].reason
        assert outcomes[1].status == "ok"
        assert all(set(f) == {factor} for f in sent.values())
        one = record_bytes(RecordDict({"update": tensors_to_record(sent)}))
        assert outcomes[1].bytes_up == one
        # float64 test arrays: one factor's data plus a small header per array
        assert one - sum(v.nbytes for f in sent.values() for v in f.values()) < 64 * len(sent)

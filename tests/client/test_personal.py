"""FedSA-LoRA on a node: B is trained, kept (context and file) and never in the bytes sent up.

The real train handler on the tiny model behind the real strategy (``FakeGrid`` stands in
for Flower's engine, as in ``test_app``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

import aggregation
import client.handlers as client_app
import client.personal as personal
from aggregation import ModelSpec
from core.config import RunConfig
from core.model import module_shapes
from core.personal import PersonalStore
from core.wire import record_to_tensors
from server.app import TRAIN_KEYS
from server.local_grid import FakeGrid, task_identity
from server.strategy import LoraStrategy
from tests.privacy.helpers import tiny

NODE = 1
PARTITION = {"partition-id": 0, "num-partitions": 2}


@pytest.fixture(autouse=True)
def _identity():
    task_identity()


@pytest.fixture()
def store_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(personal, "default_directory", lambda: tmp_path / "personal")
    return tmp_path / "personal"


def _setup(tmp_path, aggregator="fedsa-lora", **extra):
    run_config = RunConfig(model="tiny", aggregator=aggregator, num_server_rounds=3, ranks="4", max_rank=8,
                           batch_size=2, local_steps=2, max_seq_len=32, eval_examples=4, run_tag="tag0",
                           dp_state_dir=str(tmp_path / "privacy"), **extra).to_flower()
    cfg = RunConfig.from_flower(run_config)
    strategy = LoraStrategy(
        aggregator=aggregation.create(aggregator),
        spec=ModelSpec(modules=module_shapes(tiny().model, cfg.targets), max_rank=cfg.max_rank),
        train_config={k: run_config[k] for k in TRAIN_KEYS}, clients_per_round=1, min_clients=1,
    )
    return run_config, strategy


def _round(strategy, context, rnd: int) -> Message:
    replies = []

    def deliver(node: int, msg: Message) -> Message:
        replies.append(client_app.train_handler(msg, context))
        return replies[-1]

    grid = FakeGrid({NODE: 4})
    grid.train_reply = deliver
    strategy.aggregate_train(rnd, grid.send_and_receive(strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(),
                                                                                 grid)))
    (reply,) = replies
    return reply


def _starting_b(monkeypatch) -> list[dict]:
    """Record the B each round starts training from (what the node loaded)."""
    seen: list[dict] = []
    real = client_app.train

    def spy(adapted, *args, **kwargs):
        seen.append({m: f["B"].detach().numpy().copy() for m, f in adapted.factors.items()})
        return real(adapted, *args, **kwargs)

    monkeypatch.setattr(client_app, "train", spy)
    return seen


def test_b_is_kept_on_the_node_and_never_in_the_reply(tmp_path, store_dir, monkeypatch):
    run_config, strategy = _setup(tmp_path)
    context = Context(run_id=1, node_id=NODE, node_config=PARTITION, state=RecordDict(), run_config=run_config)
    starts = _starting_b(monkeypatch)
    store = PersonalStore(directory=store_dir, run_key="tag0", node="partition-0")

    reply = _round(strategy, context, 1)
    sent_up = record_to_tensors(reply.content["update"])
    assert all(set(f) == {"A"} for f in sent_up.values())
    kept = store.load()
    assert kept is not None and kept.rank == 4 and kept.server_round == 1
    in_context = record_to_tensors(context.state["personal"])
    for name, f in kept.tensors.items():
        assert set(f) == {"B"} and np.abs(f["B"]).max() > 0  # trained away from PEFT's zero init
        np.testing.assert_array_equal(in_context[name]["B"], f["B"])
    # not one stored B travels in any array of the reply, under any name
    up_bytes = [bytes(a.data) for record in reply.content.array_records.values() for a in record.values()]
    for f in kept.tensors.values():
        assert not any(f["B"].astype(np.float32).tobytes() in data for data in up_bytes)
    (outcome,) = strategy.last_report.outcomes
    assert outcome.status == "ok"
    assert outcome.bytes_up == sum(len(d) for d in up_bytes)
    # personalised evaluation on the node's own held-out slice, recorded with the client row
    assert math.isfinite(outcome.metrics["personal-eval-loss"]) and outcome.metrics["personal-eval-examples"] >= 1
    assert math.isnan(strategy.last_report.relative_error)  # the server cannot know the clients' adapters

    _round(strategy, context, 2)  # the same process: B from the context
    restarted = Context(run_id=2, node_id=NODE, node_config=PARTITION, state=RecordDict(), run_config=run_config)
    before_restart = store.load()
    _round(strategy, restarted, 3)  # a new process (or a resumed run): B from the file
    np.testing.assert_array_equal(starts[0][next(iter(starts[0]))], 0.0)  # round 1: PEFT's B = 0
    for name in kept.tensors:
        np.testing.assert_allclose(starts[1][name], kept.tensors[name]["B"])
        np.testing.assert_allclose(starts[2][name], before_restart.tensors[name]["B"])
    assert store.load().server_round == 3


def test_a_shared_method_keeps_nothing_on_the_node(tmp_path, store_dir):
    run_config, strategy = _setup(tmp_path, aggregator="ffa-lora")
    context = Context(run_id=1, node_id=NODE, node_config=PARTITION, state=RecordDict(), run_config=run_config)
    reply = _round(strategy, context, 1)
    assert "personal-eval-loss" not in reply.content["metrics"]
    assert "personal" not in context.state.array_records and not store_dir.exists()


def test_under_dp_sgd_the_node_trains_on_all_its_examples_and_reports_no_heldout_loss(tmp_path, store_dir):
    run_config, strategy = _setup(tmp_path, dp_epsilon=8.0)
    context = Context(run_id=1, node_id=NODE, node_config=PARTITION, state=RecordDict(), run_config=run_config)
    reply = _round(strategy, context, 1)
    metrics = reply.content["metrics"]
    assert "personal-eval-loss" not in metrics and metrics["dp-epsilon"] > 0
    cfg = RunConfig.from_flower(run_config)
    assert metrics["num-examples"] == len(client_app.local_examples(context, cfg))
    assert PersonalStore(directory=store_dir, run_key="tag0", node="partition-0").load() is not None


def test_with_federated_evaluation_the_node_scores_its_adapter_on_that_held_out_slice(tmp_path, store_dir):
    from client.node import node_split

    run_config, strategy = _setup(tmp_path, fraction_evaluate=1.0)
    context = Context(run_id=1, node_id=NODE, node_config=PARTITION, state=RecordDict(), run_config=run_config)
    reply = _round(strategy, context, 1)
    train_part, heldout = node_split(context, RunConfig.from_flower(run_config))
    metrics = reply.content["metrics"]
    # one held-out slice per node, the one federated evaluation uses: not carved twice
    assert metrics["num-examples"] == len(train_part) and metrics["personal-eval-examples"] == len(heldout) > 0

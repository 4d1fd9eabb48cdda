"""Federated evaluation on the node (client.evaluate, client.node.node_split), without Flower.

The node scores exactly the model it would train from: the server's global adapter as
folded factors (Fed-SB's B·R·A) plus the base updates it holds. Its held-out slice is
never trained on, and switching federated evaluation on leaves a DP node's privacy ledger
where it was (one ledger per node's whole data).
"""

from __future__ import annotations

import copy
import json
from collections import Counter

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

import aggregation
import client.evaluate as node_eval
import client.handlers as handlers
from aggregation import ClientInfo, ClientUpdate, ModelSpec
from client.node import local_examples, node_split
from core.config import RunConfig
from core.model import AdaptedModel, AdapterSpec, module_shapes
from core.trainer import evaluate
from privacy.ledger import dataset_fingerprint
from server import federated_eval as fe
from server.app import TRAIN_KEYS
from server.local_grid import FakeGrid, task_identity
from server.rounds import NodeState
from server.strategy import LoraStrategy
from tests.privacy.helpers import tiny

NODE = 1
PARTITION = {"partition-id": 1, "num-partitions": 3}
MAX_RANK = 4
ALPHA = 8.0


@pytest.fixture(autouse=True)
def _identity():
    task_identity()


def _run_config(tmp_path, **overrides) -> dict:
    values = dict(model="tiny", num_server_rounds=1, ranks="4", max_rank=MAX_RANK, lora_alpha=ALPHA, batch_size=2,
                  local_steps=2, max_seq_len=32, eval_examples=0, fraction_evaluate=1.0, node_eval_fraction=0.1,
                  dp_state_dir=str(tmp_path / "privacy"))
    return RunConfig(**{**values, **overrides}).to_flower()


def _context(run_config: dict, node_config: dict | None = None) -> Context:
    return Context(run_id=1, node_id=NODE, node_config=dict(PARTITION if node_config is None else node_config),
                   state=RecordDict(), run_config=run_config)


def _spec() -> ModelSpec:
    return ModelSpec(modules=module_shapes(tiny().model, ("q_proj", "v_proj")), max_rank=MAX_RANK)


def _trained_state(name: str, seed: int = 0):
    """The aggregator's state after one client's (random, non-trivial) update at max rank."""
    agg = aggregation.create(name)
    spec = _spec()
    state = agg.init_state(spec)
    rng = np.random.default_rng(seed)
    shapes = {"A": lambda s: (MAX_RANK, s.d_in), "B": lambda s: (s.d_out, MAX_RANK), "R": lambda _s: (MAX_RANK,) * 2}
    factors = "R" if agg.adapter_kind == "bra" else "AB"
    tensors = {m: {k: 0.5 * rng.normal(size=shapes[k](s)) for k in factors} for m, s in spec.modules.items()}
    update = ClientUpdate(node_id="n", num_examples=10, rank=MAX_RANK, alpha=ALPHA, tensors=tensors)
    return agg, agg.aggregate(state, [update]).state


def _message(global_delta, *, merged_through: int = 0, merge_log=()) -> Message:
    node = NodeState(key="partition-1", rank=MAX_RANK, alpha=ALPHA, num_examples=10, merged_through=merged_through)
    (msg,) = fe.evaluation_messages(server_round=2, nodes={NODE: node}, global_delta=global_delta,
                                    merge_log=list(merge_log), max_seq_len=32)
    return msg


def _answer(msg: Message, context: Context) -> fe.NodeEvaluationResult:
    reply = node_eval.handle(msg, context)
    reply.metadata._src_node_id = NODE  # what the engine sets on delivery
    return fe.read_evaluation(reply, key="partition-1", bytes_down=0)


@pytest.mark.parametrize("name", ["fedavg", "fed-sb"])
def test_the_node_scores_the_model_it_would_train_from(tmp_path, name):
    """Evaluating the folded global delta equals evaluating the downlinked adapter (PEFT / B·R·A) directly."""
    run_config = _run_config(tmp_path)
    context = _context(run_config)
    agg, state = _trained_state(name)
    got = _answer(_message(agg.global_delta(state)), context)
    assert got.status == "ok", got.reason

    _, heldout = node_split(context, RunConfig.from_flower(run_config))
    base = tiny()
    down = agg.downlink(state, ClientInfo(node_id="n", rank=MAX_RANK, alpha=ALPHA))
    direct = AdaptedModel(copy.deepcopy(base.model),
                          AdapterSpec(kind=agg.adapter_kind, rank=MAX_RANK, alpha=ALPHA, targets=("q_proj", "v_proj")))
    if down.frozen:
        direct.load(down.frozen)
    direct.load(down.adapter)
    want = evaluate(direct.model, heldout, base.tokenizer, max_len=32)
    untrained = evaluate(copy.deepcopy(base.model), heldout, base.tokenizer, max_len=32)
    assert got.loss == pytest.approx(want.loss, rel=1e-5, abs=1e-6)
    assert got.num_examples == want.examples == len(heldout) and got.tokens == want.tokens
    assert abs(want.loss - untrained.loss) > 1e-4  # the adapter matters: a node ignoring it would fail above


def test_base_updates_are_folded_in_before_the_global_adapter(tmp_path):
    run_config = _run_config(tmp_path)
    agg, state = _trained_state("fedavg")
    _, merged = _trained_state("fedavg", seed=1)
    base_update = agg.global_delta(merged)  # a base update of round 1, as FLoRA logs them
    with_merge = _answer(_message(agg.global_delta(state), merge_log=[(1, base_update)]), _context(run_config))
    without = _answer(_message(agg.global_delta(state)), _context(run_config))
    assert with_merge.status == without.status == "ok" and with_merge.merged_through == 1
    assert abs(with_merge.loss - without.loss) > 1e-4

    # the same base update, sent once and held in the node's state, gives the same score next time
    context = _context(run_config)
    _answer(_message(agg.global_delta(state), merge_log=[(1, base_update)]), context)
    again = _answer(_message(agg.global_delta(state), merged_through=1, merge_log=[(1, base_update)]), context)
    assert again.loss == pytest.approx(with_merge.loss, rel=1e-6)


def test_a_node_lacking_base_updates_answers_resync_and_says_what_it_holds(tmp_path):
    agg, state = _trained_state("fedavg")
    base_update = agg.global_delta(state)
    # the server believes the node holds round 1 and sends round 2 only; the node lost its state
    msg = _message(agg.global_delta(state), merged_through=1, merge_log=[(1, base_update), (2, base_update)])
    got = _answer(msg, _context(_run_config(tmp_path)))
    assert got.status == "resync" and got.reason == "node lacks base updates [1]"
    assert got.merged_through == 0 and got.loss is None


def test_without_federated_evaluation_there_is_no_held_out_slice_and_the_node_says_so(tmp_path):
    run_config = _run_config(tmp_path, fraction_evaluate=0.0)
    context = _context(run_config)
    train, heldout = node_split(context, RunConfig.from_flower(run_config))
    assert heldout == [] and train == local_examples(context, RunConfig.from_flower(run_config))
    agg, state = _trained_state("fedavg")
    got = _answer(_message(agg.global_delta(state)), context)
    assert got.status == "failed" and "fraction-evaluate 0" in got.reason


def _ids(examples) -> set[int]:
    return {id(e) for e in examples}


@pytest.mark.parametrize("node_config", [{"partition-id": p, "num-partitions": 3} for p in range(3)]
                         + [{"partition-id": 0, "num-partitions": 2, "node-eval-fraction": 0.3}])
def test_held_out_and_training_examples_are_disjoint_and_together_the_nodes_data(tmp_path, node_config):
    run_config = _run_config(tmp_path, node_eval_fraction=0.2)
    cfg = RunConfig.from_flower(run_config)
    context = _context(run_config, node_config)
    train, heldout = node_split(context, cfg)
    data = local_examples(context, cfg)
    assert not _ids(train) & _ids(heldout) and _ids(train) | _ids(heldout) == _ids(data)
    fraction = node_config.get("node-eval-fraction", 0.2)  # the node's own share overrides the run's
    # round(len * fraction), moved to the nearer end of a group of copies the cut would split
    target = max(1, round(len(data) * fraction))
    assert abs(len(heldout) - target) <= max(Counter(data).values()) / 2
    assert (train, heldout) == node_split(_context(run_config, node_config), cfg)  # deterministic


def test_no_held_out_example_is_also_trained_on_by_content(tmp_path):
    run_config = _run_config(tmp_path, node_eval_fraction=0.2)
    cfg = RunConfig.from_flower(run_config)
    train, heldout = node_split(_context(run_config, {"partition-id": 1, "num-partitions": 2}), cfg)
    assert not {(e.prompt, e.response) for e in train} & {(e.prompt, e.response) for e in heldout}


def test_a_node_in_deployment_holds_out_part_of_its_own_file(tmp_path):
    path = tmp_path / "node.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"question {i}", "output": f"answer {i}"}) + "\n"
                            for i in range(40)))
    run_config = _run_config(tmp_path)
    context = _context(run_config, {"data-path": str(path), "node-name": "hospital-a", "node-eval-fraction": 0.25})
    train, heldout = node_split(context, RunConfig.from_flower(run_config))
    assert len(heldout) == 10 and len(train) == 30
    assert not {e.prompt for e in train} & {e.prompt for e in heldout}


def test_a_node_with_a_single_example_cannot_hold_one_out_and_fails_with_the_reason(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    context = _context(_run_config(tmp_path), {"data-path": str(path), "node-name": "tiny-clinic"})
    agg, state = _trained_state("fedavg")
    got = _answer(_message(agg.global_delta(state)), context)
    assert got.status == "failed" and "tiny-clinic has 1 example(s)" in got.reason


# --- DP: the ledger is the node's whole data's -------------------------------------------------


def _train_one_round(run_config: dict) -> tuple[dict, int]:
    """One DP-SGD round of the real handlers behind the real strategy; (reply metrics, examples trained on)."""
    cfg = RunConfig.from_flower(run_config)
    context = _context(run_config)
    grid = FakeGrid({NODE: MAX_RANK})
    grid.train_reply = lambda node, msg: handlers.train_handler(msg, context)
    strategy = LoraStrategy(aggregator=aggregation.create("fedavg"), spec=_spec(),
                            train_config={k: run_config[k] for k in TRAIN_KEYS}, clients_per_round=1,
                            min_clients=1, on_insufficient="skip")
    replies = grid.send_and_receive(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    strategy.aggregate_train(1, replies)
    (outcome,) = strategy.last_report.outcomes
    assert outcome.status == "ok", outcome.reason
    return outcome.metrics, len(node_split(context, cfg)[0])


def test_switching_federated_evaluation_on_keeps_a_dp_nodes_one_ledger(tmp_path):
    ledgers = tmp_path / "privacy"
    off, trained_off = _train_one_round(_run_config(tmp_path, dp_epsilon=8.0, fraction_evaluate=0.0, run_tag="off"))
    (ledger,) = ledgers.glob("*.json")  # beside its .lock
    after_off = json.loads(ledger.read_text())
    on, trained_on = _train_one_round(_run_config(tmp_path, dp_epsilon=8.0, fraction_evaluate=1.0, run_tag="on"))
    assert list(ledgers.glob("*.json")) == [ledger]  # the same file: no fresh budget for the same data
    after_on = json.loads(ledger.read_text())
    context = _context(_run_config(tmp_path))
    assert after_on["dataset"] == dataset_fingerprint(local_examples(context, RunConfig.from_flower(
        _run_config(tmp_path))))  # the node's whole data, held-out slice included
    assert sorted(after_on["plans"]) == ["off", "on"]
    assert len(after_on["history"]) > len(after_off["history"]) and on["dp-epsilon"] > off["dp-epsilon"]
    assert trained_on < trained_off  # ... while it trained on the training part only
    assert after_on["plans"]["on"]["sample_rate"] > after_on["plans"]["off"]["sample_rate"]

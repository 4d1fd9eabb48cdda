"""The real ClientApp, in process, behind the real strategy and recorder (issue 11, items 2-3).

A DP round that breaks after the ledger was charged still reports the ε the ledger holds,
and the run's max ε counts it; a node whose own dp-* config is misspelt or unparsable
answers "failed" and never trains. The Flower engine is stood in for by ``FakeGrid``,
which turns an exception in the ClientApp into an error reply, as Flower's does.
"""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

import aggregation
import client.handlers as client_app
from aggregation import ModelSpec
from core.model import module_shapes
from privacy.accounting import epsilon
from privacy.ledger import PrivacyLedger, dataset_fingerprint
from server.db.read import max_epsilon
from server.app import TRAIN_KEYS
from core.config import RunConfig
from server.db.session import open_database
from server.recording import RunRecorder
from server.strategy import LoraStrategy
from tests.privacy.helpers import tiny
from server.local_grid import FakeGrid, task_identity

NODE = 1
PARTITION = {"partition-id": 0, "num-partitions": 2}


@pytest.fixture(autouse=True)
def _identity():
    task_identity()


def _run_config(tmp_path, **dp) -> dict:
    return RunConfig(model="tiny", num_server_rounds=1, ranks="4", max_rank=8, batch_size=2, local_steps=2,
                     max_seq_len=32, eval_examples=4, dp_state_dir=str(tmp_path / "privacy"), **dp).to_flower()


def _one_round(run_config: dict, node_config: dict, tmp_path):
    """One round of the strategy against the real ClientApp; returns (outcome, the run's max ε)."""
    cfg = RunConfig.from_flower(run_config)
    context = Context(run_id=1, node_id=NODE, node_config=node_config, state=RecordDict(), run_config=run_config)

    def deliver(node: int, msg: Message) -> Message:
        try:
            return client_app.train_handler(msg, context)
        except Exception as exc:  # what Flower's runtime answers for a ClientApp that raised
            return Message(Error(code=2, reason=f"{type(exc)}:<'{exc}'>"), reply_to=msg)

    grid = FakeGrid({NODE: 4})
    grid.train_reply = deliver
    strategy = LoraStrategy(
        aggregator=aggregation.create("fedavg"),
        spec=ModelSpec(modules=module_shapes(tiny().model, cfg.targets), max_rank=cfg.max_rank),
        train_config={k: run_config[k] for k in TRAIN_KEYS}, clients_per_round=1, min_clients=1,
        on_insufficient="skip",
    )
    replies = grid.send_and_receive(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    strategy.aggregate_train(1, replies)
    (outcome,) = strategy.last_report.outcomes
    engine = open_database(f"sqlite:///{tmp_path}/runs.db")
    recorder = RunRecorder(engine)
    run_id = recorder.start_run(config=run_config, aggregator="fedavg", model="tiny", tag="", flwr_run_id=None)
    recorder.record_round(run_id, strategy.last_report, None)
    return outcome, max_epsilon(engine, run_id)


def test_a_dp_round_that_fails_after_charging_the_ledger_still_reports_its_epsilon(tmp_path, monkeypatch):
    real_train = client_app.train

    def train_then_break(*args, **kwargs):
        real_train(*args, **kwargs)  # reserves, trains and commits: the ledger is charged
        raise RuntimeError("device lost before the reply was built")

    monkeypatch.setattr(client_app, "train", train_then_break)
    run_config = _run_config(tmp_path, dp_epsilon=8.0)
    outcome, summary = _one_round(run_config, PARTITION, tmp_path)

    cfg = RunConfig.from_flower(run_config)
    examples = client_app.local_examples(Context(run_id=1, node_id=NODE, node_config=PARTITION, state=RecordDict(),
                                                 run_config=run_config), cfg)
    ledger = PrivacyLedger(directory=tmp_path / "privacy", node="partition-0", dataset=dataset_fingerprint(examples))
    held = epsilon(ledger.load().history, delta=cfg.dp_delta, accountant=cfg.dp_accountant)
    assert held > 0
    assert outcome.status == "failed" and "device lost" in outcome.reason
    assert outcome.metrics["dp-epsilon"] == pytest.approx(held) and outcome.metrics["dp-steps"] == 2
    assert summary is not None and summary.epsilon == pytest.approx(held) and summary.clients == 1


@pytest.mark.parametrize(
    "node_dp, needles",
    [
        ({"dp-epsion": 2}, ["'dp-epsion'", "dp-epsilon, dp-delta"]),  # misspelt: the valid keys are listed
        ({"dp-epsilon": "abc"}, ["dp-epsilon", "'abc'"]),
        ({"dp-epsilon": 2, "dp-delta": 3}, ["dp-delta", "3"]),
    ],
)
@pytest.mark.parametrize("run_dp", [{}, {"dp_epsilon": 8.0}], ids=["run-dp-off", "run-dp-on"])
def test_a_node_with_a_bad_dp_key_answers_failed_and_never_trains(tmp_path, monkeypatch, node_dp, needles, run_dp):
    def must_not_train(*args, **kwargs):
        raise AssertionError("a node with a bad dp-* key trained")

    monkeypatch.setattr(client_app, "train", must_not_train)
    outcome, summary = _one_round(_run_config(tmp_path, **run_dp), {**PARTITION, **node_dp}, tmp_path)
    assert outcome.status == "failed", outcome
    assert not outcome.reason.startswith("client error")  # the node's own reply, not a crash
    for needle in needles:
        assert needle in outcome.reason
    assert summary is None  # nothing was charged
    assert not (tmp_path / "privacy").exists()

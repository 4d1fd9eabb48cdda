"""Fed-SB's federated LoRA-SB init (round 0) against the real node code, in process.

The Flower engine is stood in for by ``FakeGrid``: the rank query is answered by the grid,
``query.lora_sb`` by ``client.lora_sb.handle`` with each node's own context, as a SuperNode
would run it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from sqlalchemy import select
from sqlalchemy.orm import Session

from aggregation.fed_sb import INIT_SOURCES
from client import handlers, lora_sb
from core.config import RunConfig
from privacy.accounting import epsilon
from privacy.ledger import PrivacyLedger, dataset_fingerprint
from server.app import build_strategy, make_aggregator, model_spec
from server.calibration import public_split
from server.db.models import InitRecord
from server.db.session import open_database
from server.local_grid import FakeGrid, task_identity
from server.lora_sb_round import ACTION, SOURCES, InitRequest, initialise
from server.recording import RunRecorder
from server.rounds import InsufficientReplies
from tests.privacy.helpers import tiny
from tests.server.test_calibration import best_rank, dense_gradients

NODES = (1, 2)


@pytest.fixture(autouse=True)
def _identity():
    task_identity()


def _cfg(tmp_path, **kwargs) -> RunConfig:
    values = dict(aggregator="fed-sb", sb_init="federated", model="tiny", max_rank=4, ranks="4", batch_size=4,
                  calibration_batches=2, max_seq_len=32, clients_per_round=2, min_clients=1, learning_rate=0.01, sb_init_lr=0.02,
                  sb_init_oversample=32, eval_examples=4, dp_state_dir=str(tmp_path / "privacy"))
    return RunConfig(**{**values, **kwargs})


def _contexts(cfg: RunConfig, node_configs: dict[int, dict] | None = None) -> dict[int, Context]:
    node_configs = node_configs or {}
    return {n: Context(run_id=1, node_id=n, state=RecordDict(), run_config=cfg.to_flower(),
                       node_config={"partition-id": n - 1, "num-partitions": 2, **node_configs.get(n, {})})
            for n in NODES}


def _grid(contexts: dict[int, Context], answer=lora_sb.handle) -> FakeGrid:
    grid = FakeGrid({n: 4 for n in contexts})

    def deliver(node: int, msg: Message) -> Message:
        assert msg.metadata.message_type == ACTION == f"query.{lora_sb.ACTION}"
        try:
            reply = answer(msg, contexts[node])
        except Exception as exc:  # what Flower's runtime answers for a ClientApp that raised
            reply = Message(Error(code=2, reason=f"{type(exc)}:<'{exc}'>"), reply_to=msg)
        reply.metadata._src_node_id = node
        return reply

    grid.train_reply = deliver
    return grid


def _reference(cfg: RunConfig, contexts: dict[int, Context], nodes=NODES) -> dict[str, np.ndarray]:
    """Per module: the best rank-r approximation of -lr sqrt(mn) G / ||G||, G summed densely over the nodes."""
    base = tiny()
    total: dict[str, np.ndarray] = {}
    for n in nodes:
        ctx = contexts[n]
        chosen = lora_sb.calibration_examples(
            handlers.node_split(ctx, cfg)[0], cfg.calibration_batches * cfg.batch_size,
            seed=handlers.stable_seed(cfg.seed, "lora-sb", handlers.node_key(ctx)))
        for name, g in dense_gradients(base.model, base.tokenizer, chosen, targets=cfg.targets,
                                       batch_size=cfg.batch_size, max_len=cfg.max_seq_len).items():
            total[name] = total.get(name, 0) + g
    out = {}
    for name, g in total.items():
        step = -cfg.sb_init_lr * np.sqrt(g.size) * g / np.linalg.norm(g)
        out[name] = best_rank(step, cfg.max_rank)
    return out


def _bra(initial) -> dict[str, np.ndarray]:
    return {name: f["B"] @ f["R"] @ f["A"] for name, f in initial.items()}


def test_every_sb_init_name_has_its_computation():
    assert set(SOURCES) == set(INIT_SOURCES)


def test_federated_init_is_the_best_rank_r_approximation_of_the_summed_step_and_is_recorded(tmp_path):
    """A sketch as wide as the module recovers G exactly: B R A is then Eckart-Young of the dense step."""
    cfg = _cfg(tmp_path)
    contexts = _contexts(cfg)
    recorder = RunRecorder(open_database(f"sqlite:///{tmp_path}/runs.db"))
    run_id = recorder.start_run(config=cfg.to_flower(), aggregator="fed-sb", model="tiny", tag="", flwr_run_id=None)
    strategy = build_strategy(cfg, recorder, run_id, grid=_grid(contexts))
    got = _bra(strategy.inner.state.factors)
    expected = _reference(cfg, contexts)
    assert sorted(got) == sorted(expected)
    for name in got:  # float32 on the wire: agreement to ~1e-5 of the step's size (sb-init-lr, not the lr)
        np.testing.assert_allclose(got[name], expected[name], atol=1e-5 * cfg.sb_init_lr, err_msg=name)
    with Session(recorder.engine) as session:
        row = session.scalars(select(InitRecord).where(InitRecord.run_id == run_id)).one()
    assert row.kind == "federated" and row.seconds > 0
    assert [n["status"] for n in row.details["nodes"]] == ["ok", "ok"]
    assert row.bytes_up == sum(n["bytes_up"] for n in row.details["nodes"]) > 0
    assert row.details["examples"] == 2 * cfg.calibration_batches * cfg.batch_size


def test_the_init_never_reads_a_nodes_federated_evaluation_slice(tmp_path, monkeypatch):
    # with federated evaluation on, the sketch is of training examples only, as training is
    cfg = _cfg(tmp_path, fraction_evaluate=1.0, node_eval_fraction=0.5, calibration_batches=50)
    contexts = _contexts(cfg)
    seen: list = []
    real = lora_sb.node_sketches
    monkeypatch.setattr(lora_sb, "node_sketches", lambda model, tok, chosen, *a, **k: (
        seen.append(list(chosen)), real(model, tok, chosen, *a, **k))[1])
    recorder = RunRecorder(open_database(f"sqlite:///{tmp_path}/runs.db"))
    run_id = recorder.start_run(config=cfg.to_flower(), aggregator="fed-sb", model="tiny", tag="", flwr_run_id=None)
    build_strategy(cfg, recorder, run_id, grid=_grid(contexts))
    assert len(seen) == len(NODES)
    for chosen, ctx in zip(seen, contexts.values()):
        train, heldout = handlers.node_split(ctx, cfg)
        assert heldout and not set(chosen) & set(heldout)
        assert len(chosen) == min(len(train), cfg.calibration_batches * cfg.batch_size)


def _ledger(cfg: RunConfig, ctx: Context) -> PrivacyLedger:
    return PrivacyLedger(directory=Path(cfg.dp_state_dir), node=f"partition-{ctx.node_config['partition-id']}",
                         dataset=dataset_fingerprint(handlers.local_examples(ctx, cfg)))


def test_with_dp_each_node_is_charged_once_and_a_node_past_its_budget_declines(tmp_path):
    # σ fixed at 1 (one Gaussian release at q = 1 costs ε ≈ 4.4 at δ = 1e-5); node 2 demands ε <= 1 itself
    cfg = _cfg(tmp_path, dp_noise_multiplier=1.0, dp_epsilon=50.0)
    contexts = _contexts(cfg, {2: {"dp-epsilon": 1.0}})
    result = initialise(InitRequest(cfg=cfg, base=tiny(), spec=model_spec(cfg, tiny().model), split=public_split(cfg),
                                    grid=_grid(contexts)))
    first, second = result.details["nodes"]
    assert first["status"] == "ok" and second["status"] == "declined"
    assert "budget exhausted" in second["reason"] and second["bytes_up"] == 0
    history = _ledger(cfg, contexts[1]).load().history
    assert history == ((1.0, 1.0, 1),)  # exactly one release, charged once
    assert first["metrics"]["dp-epsilon"] == pytest.approx(epsilon(history, delta=cfg.dp_delta, accountant="prv"))
    assert 1.0 < first["metrics"]["dp-epsilon"] < 50.0
    assert _ledger(cfg, contexts[2]).load().history == ()  # declined: nothing charged
    assert result.initial is not None  # min-clients 1: node 1's noised sketch is enough
    # the noise is there: the init is not the noise-free one
    clean = _reference(cfg, contexts, nodes=(1,))
    assert any(np.abs(v - clean[k]).max() > 1e-6 for k, v in _bra(result.initial).items())


def test_a_calibrated_release_spends_at_most_its_share_of_the_budget(tmp_path):
    cfg = _cfg(tmp_path, dp_epsilon=8.0, sb_init_dp_share=0.25, clients_per_round=1)
    contexts = _contexts(cfg)
    result = initialise(InitRequest(cfg=cfg, base=tiny(), spec=model_spec(cfg, tiny().model), split=public_split(cfg),
                                    grid=_grid(contexts)))
    (node,) = result.details["nodes"]
    assert node["status"] == "ok"
    spent = node["metrics"]["dp-epsilon"]
    assert 1.5 < spent <= 2.0 and node["metrics"]["dp-steps"] == 1


def test_a_malformed_contribution_is_rejected_and_the_rest_used(tmp_path):
    cfg = _cfg(tmp_path)
    contexts = _contexts(cfg)

    def answer(msg, ctx):
        reply = lora_sb.handle(msg, ctx)
        if ctx.node_id == 2:  # a node that sends the wrong shapes
            from core.wire import record_to_tensors, tensors_to_record

            bad = {m: {k: v[:-1] for k, v in f.items()} for m, f in record_to_tensors(reply.content["update"]).items()}
            reply.content["update"] = tensors_to_record(bad)
        return reply

    result = initialise(InitRequest(cfg=cfg, base=tiny(), spec=model_spec(cfg, tiny().model), split=public_split(cfg),
                                    grid=_grid(contexts, answer)))
    statuses = [(n["status"], n["reason"] or "") for n in result.details["nodes"]]
    assert statuses[0] == ("ok", "") and statuses[1][0] == "rejected" and "expected" in statuses[1][1]
    expected = _reference(cfg, contexts, nodes=(1,))
    for name, value in _bra(result.initial).items():
        np.testing.assert_allclose(value, expected[name], atol=1e-5 * cfg.sb_init_lr)


def test_too_few_usable_contributions_stop_the_run_naming_why(tmp_path):
    cfg = _cfg(tmp_path, dp_noise_multiplier=1.0, dp_epsilon=1.0, min_clients=1)
    with pytest.raises(InsufficientReplies, match="0 usable contributions < min-clients 1.*declined"):
        initialise(InitRequest(cfg=cfg, base=tiny(), spec=model_spec(cfg, tiny().model), split=public_split(cfg),
                               grid=_grid(_contexts(cfg))))


def test_federated_init_with_central_dp_needs_local_dp():
    central = dict(aggregator="fed-sb", sb_init="federated", dp_central_clip=0.1, dp_central_noise=1.0)
    with pytest.raises(ValueError, match="outside the user-level accounting"):
        make_aggregator(RunConfig(**central), None, calibrate=False)
    make_aggregator(RunConfig(**central, dp_noise_multiplier=1.0), None, calibrate=False)  # local DP on: allowed

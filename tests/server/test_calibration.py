"""Fed-SB's server-public LoRA-SB init: Eckart-Young against a dense reference, and disjoint data."""

import copy
import json

import numpy as np
import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.config import RunConfig
from core.data import Example, collate, load_examples, split_heldout
from core.presets import load_base
from core.trainer import sequence_losses
from server.app import build_strategy, make_aggregator, model_spec
from server.calibration import example_id, lora_sb_calibration, public_split
from server.db.models import InitRecord
from server.db.session import open_database
from server.local_grid import FakeGrid
from server.recording import RunRecorder


@pytest.fixture(scope="module")
def base():
    return load_base("tiny")


def dense_gradients(model, tokenizer, examples, *, targets, batch_size, max_len) -> dict[str, np.ndarray]:
    """The summed gradient of each target weight, written out here without the project's helper."""
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(False)
    weights = {n: m.weight for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets}
    for w in weights.values():
        w.requires_grad_(True)
    total = {n: torch.zeros_like(w) for n, w in weights.items()}
    for start in range(0, len(examples), batch_size):
        sequence_losses(model, collate(examples[start:start + batch_size], tokenizer, max_len)).sum().backward()
        for n, w in weights.items():
            total[n] += w.grad
            w.grad = None
    return {n: t.double().numpy() for n, t in total.items()}


def best_rank(m: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return u[:, :r] * s[:r] @ vt[:r]


@pytest.mark.parametrize("rank", [3, 16])
def test_b_r_a_is_the_best_rank_r_approximation_of_the_sign_step(base, rank):
    """LoRA-SB's definition: B R A = best rank-r approximation of -lr * sign(sum of gradients)."""
    lr, examples = 0.01, load_examples("chatterbot")[:12]
    targets = ("q_proj", "v_proj")
    init = lora_sb_calibration(copy.deepcopy(base.model), base.tokenizer, examples, targets=targets, rank=rank,
                               learning_rate=lr, batch_size=4, max_len=48, threads=1)
    grads = dense_gradients(base.model, base.tokenizer, examples, targets=targets, batch_size=4, max_len=48)
    assert sorted(init) == sorted(grads) and len(init) == 4
    for name, factors in init.items():
        step = -lr * np.sign(grads[name])
        np.testing.assert_allclose(factors["B"] @ factors["R"] @ factors["A"], best_rank(step, rank), atol=1e-9)
        np.testing.assert_allclose(factors["B"].T @ factors["B"], np.eye(rank), atol=1e-9)


def test_full_rank_init_reconstructs_the_sign_step(base):
    """At full rank, B R A is exactly -lr * sign(summed gradient): entries are +-lr."""
    lr = 0.01
    init = lora_sb_calibration(copy.deepcopy(base.model), base.tokenizer, load_examples("chatterbot")[:16],
                               targets=("q_proj",), rank=32, learning_rate=lr, batch_size=8, max_len=48)
    for factors in init.values():
        np.testing.assert_allclose(np.abs(factors["B"] @ factors["R"] @ factors["A"]), lr, rtol=1e-6)


def test_calibration_leaves_the_model_untouched(base):
    model = copy.deepcopy(base.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora_sb_calibration(model, base.tokenizer, load_examples("chatterbot")[:8], targets=("v_proj",), rank=4,
                        learning_rate=0.01, batch_size=8, max_len=32)
    for k, v in model.state_dict().items():
        assert (v == before[k]).all(), k
    assert not any(p.requires_grad for p in model.parameters())


def _recorded(cfg: RunConfig, tmp_path):
    recorder = RunRecorder(open_database(f"sqlite:///{tmp_path}/runs.db"))
    run_id = recorder.start_run(config=cfg.to_flower(), aggregator=cfg.aggregator, model=cfg.model, tag="",
                                flwr_run_id=None)
    strategy = build_strategy(cfg, recorder, run_id, grid=FakeGrid({}))
    with Session(recorder.engine) as session:
        row = session.scalars(select(InitRecord).where(InitRecord.run_id == run_id)).one()
    return strategy, row


def _cfg(**kwargs) -> RunConfig:
    return RunConfig(aggregator="fed-sb", model="tiny", max_rank=4, ranks="4", batch_size=4, calibration_batches=2,
                     max_seq_len=32, eval_examples=1000, **kwargs)


def test_calibration_and_evaluation_examples_are_disjoint_in_the_record(tmp_path):
    cfg = _cfg()
    strategy, row = _recorded(cfg, tmp_path)
    assert row.kind == "server-public" and row.seconds > 0
    calibration, evaluation = row.details["calibration-ids"], row.details["evaluation-ids"]
    assert len(calibration) == 8 and not set(calibration) & set(evaluation)
    # what the evaluator reads is exactly the recorded evaluation part ...
    assert evaluation == [example_id(e) for e in strategy.evaluations.evaluate.examples]
    # ... and the two parts are the whole held-out split, which no client trains on
    _, heldout = split_heldout(load_examples(cfg.data), cfg.eval_fraction, cfg.seed)
    assert set(calibration) | set(evaluation) == {example_id(e) for e in heldout}
    # the LoRA-SB init is in force: the global adapter does not start at zero
    assert any(np.abs(f["B"] @ f["A"]).max() > 0 for f in strategy.inner.aggregator.global_delta(
        strategy.inner.state).values())


def test_calibration_data_that_overlaps_the_heldout_part_is_kept_out_of_the_evaluation(tmp_path):
    _, heldout = split_heldout(load_examples("chatterbot"), 0.1, 0)
    own = [Example(f"public question {i}?", f"public answer {i}.") for i in range(5)]
    path = tmp_path / "public.jsonl"
    path.write_text("".join(json.dumps({"instruction": e.prompt, "output": e.response}) + "\n"
                            for e in [*heldout[:3], *own]))
    strategy, row = _recorded(_cfg(calibration_data=str(path)), tmp_path)
    calibration, evaluation = row.details["calibration-ids"], row.details["evaluation-ids"]
    assert row.details["source"] == str(path) and len(calibration) == 8
    assert not set(calibration) & set(evaluation)
    assert len(evaluation) == len(heldout) - 3


def test_random_init_is_recorded_and_starts_at_zero(tmp_path):
    strategy, row = _recorded(_cfg(sb_init="random"), tmp_path)
    assert row.kind == "random" and row.details == {}
    delta = strategy.inner.aggregator.global_delta(strategy.inner.state)
    assert all(np.abs(f["B"] @ f["A"]).max() == 0 for f in delta.values())
    # without a server-public init the evaluation reads the whole held-out part
    assert len(strategy.evaluations.evaluate.examples) == len(public_split(_cfg(sb_init="random")).evaluation)


def test_a_heldout_part_too_small_for_calibration_and_evaluation_is_refused():
    cfg = RunConfig(aggregator="fed-sb", model="tiny", max_rank=4, ranks="4", batch_size=64, calibration_batches=4)
    with pytest.raises(ValueError, match="held-out part of 'chatterbot' has 236 examples.*takes 256"):
        public_split(cfg)


def test_fed_sb_uses_the_calibration_init_when_built_alone(base):
    cfg = RunConfig(aggregator="fed-sb", model="tiny", max_rank=4, ranks="2,4", calibration_batches=1)
    agg = make_aggregator(cfg, base)
    delta = agg.global_delta(agg.init_state(model_spec(cfg, base.model)))
    assert any(np.abs(f["B"] @ f["A"]).max() > 0 for f in delta.values())  # random init would start at zero


def test_aggregator_options_are_parsed_and_bad_ones_named(base):
    assert RunConfig(aggregator_options="solver=paper, ridge=0.1").aggregator_kwargs == {"solver": "paper", "ridge": 0.1}
    with pytest.raises(ValueError, match="'ridge'"):
        RunConfig(aggregator_options="ridge")
    with pytest.raises(ValueError, match="bogus"):
        make_aggregator(RunConfig(aggregator="fedavg", aggregator_options="bogus=1"), base)
    with pytest.raises(ValueError, match="only used by fed-sb"):
        make_aggregator(RunConfig(aggregator="fedavg", calibration_data="chatterbot"), base)
    with pytest.raises(ValueError, match="sb-init must be one of"):
        RunConfig(sb_init="public")
    with pytest.raises(ValueError, match="only read by sb-init=server-public"):
        RunConfig(aggregator="fed-sb", sb_init="federated", calibration_data="chatterbot")

"""Exported adapters load with PEFT and reproduce the platform's global model."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file
from transformers import AutoTokenizer

import aggregation
from aggregation.base import ClientUpdate, ModelSpec
from core.model import module_shapes
from core.presets import SMOLLM2_HUB_ID, load_base
from server import checkpoint as ckpt
from cli.app import main
from server.db.session import open_database
from server.export import export_run, platform_model, truncated_adapter, used_components
from server.recording import RunRecorder, SavedCheckpoint
from server.rounds import ClientOutcome, RoundReport

TARGETS = ("q_proj", "v_proj")
IDS = torch.tensor([[3, 17, 42, 99, 5, 250, 7]])


@pytest.fixture(scope="module")
def base():
    return load_base("tiny")


def _run_with_checkpoint(tmp_path, base, aggregator: str, state, merge_log, *, model="tiny", outcomes=(),
                         extra_config=None):
    db = f"sqlite:///{tmp_path}/runs.db"
    recorder = RunRecorder(open_database(db))
    config = {"model": model, "target-modules": ",".join(TARGETS), "aggregator": aggregator, **(extra_config or {})}
    run_id = recorder.start_run(config=config, aggregator=aggregator, model=model, tag="", flwr_run_id=None)
    c = ckpt.Checkpoint(round=len(merge_log) or 1, aggregator=aggregator, state=state, merge_log=merge_log,
                        rng_state=np.random.default_rng(0).bit_generator.state, config=config)
    path, sha = ckpt.save(c, recorder.checkpoint_directory(run_id, tmp_path / "ckpt"))
    from datetime import datetime

    report = RoundReport(number=c.round, started_at=datetime.now(), finished_at=datetime.now(), outcomes=outcomes,
                         aggregated=True, train_loss=None, relative_error=None, aggregate_seconds=0.0)
    recorder.record_round(run_id, report, None, SavedCheckpoint(path, sha, c.config_hash))
    return db, run_id, c


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_exact_adapter_gives_the_platform_logits(tmp_path, base):
    spec = ModelSpec(modules=module_shapes(base.model, TARGETS), max_rank=4, seed=0)
    agg = aggregation.create("fedavg")
    rng = np.random.default_rng(0)
    state = agg.init_state(spec)
    state = type(state)(factors={m: {"A": rng.normal(size=f["A"].shape), "B": rng.normal(size=f["B"].shape) * 0.1}
                                 for m, f in state.factors.items()}, max_rank=4)
    db, run_id, c = _run_with_checkpoint(tmp_path, base, "fedavg", state, [])
    result = export_run(db, run_id, tmp_path / "out")
    assert result.relative_error == 0.0 and result.rank == 4
    loaded = PeftModel.from_pretrained(copy.deepcopy(base.model), tmp_path / "out")
    torch.testing.assert_close(_logits(loaded), _logits(platform_model(base.model, c)), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(_logits(loaded), _logits(base.model), atol=1e-3)  # the adapter does something


def test_flora_svd_export_reports_its_true_error(tmp_path, base, capsys):
    spec = ModelSpec(modules=module_shapes(base.model, TARGETS), max_rank=4, seed=0)
    agg = aggregation.create("flora")
    rng = np.random.default_rng(1)
    merge_log = [
        (r, {m: {"B": rng.normal(size=(s.d_out, 6)) * 0.05, "A": rng.normal(size=(6, s.d_in))} for m, s in spec.modules.items()})
        for r in (1, 2, 3)
    ]
    db, run_id, c = _run_with_checkpoint(tmp_path, base, "flora", agg.init_state(spec), merge_log)

    assert main(["export", str(run_id), "--out", str(tmp_path / "svd"), "--rank", "5", "--db", db]) == 0
    printed = float(capsys.readouterr().out.split("||accumulated||_F:")[1].split()[0])
    loaded = PeftModel.from_pretrained(copy.deepcopy(base.model), tmp_path / "svd")
    err_sq = tot_sq = 0.0
    for name in spec.modules:
        accumulated = sum(u[name]["B"] @ u[name]["A"] for _, u in merge_log)
        layer = dict(loaded.base_model.model.named_modules())[name]
        exported = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().double().numpy()
        err_sq += np.sum((accumulated - exported) ** 2)
        tot_sq += np.sum(accumulated**2)
    measured = float(np.sqrt(err_sq / tot_sq))
    assert 0 < measured < 1
    assert printed == pytest.approx(measured, rel=1e-4)

    merged = export_run(db, run_id, tmp_path / "merged", merged=True)
    assert merged.kind == "merged"
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(reloaded), _logits(platform_model(base.model, c)), atol=1e-4, rtol=1e-4)


def test_export_of_unknown_run_names_it(tmp_path, capsys):
    db = f"sqlite:///{tmp_path}/empty.db"
    open_database(db)
    assert main(["export", "42", "--out", str(tmp_path / "o"), "--db", db]) == 2
    assert "run 42" in capsys.readouterr().out


def _fedavg_run(tmp_path, base):
    spec = ModelSpec(modules=module_shapes(base.model, TARGETS), max_rank=4, seed=0)
    agg = aggregation.create("fedavg")
    rng = np.random.default_rng(0)
    state = agg.init_state(spec)
    state = type(state)(factors={m: {"A": rng.normal(size=f["A"].shape), "B": rng.normal(size=f["B"].shape)}
                                 for m, f in state.factors.items()}, max_rank=4)
    return _run_with_checkpoint(tmp_path, base, "fedavg", state, [])


def test_export_refuses_a_non_empty_directory_unless_forced(tmp_path, base, capsys):
    db, run_id, _ = _fedavg_run(tmp_path, base)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["export", str(run_id), "--out", str(out), "--db", db]) == 2
    message = capsys.readouterr().out
    assert str(out) in message.replace("\n", "") and "--force" in message
    assert [p.name for p in out.iterdir()] == ["notes.txt"]  # nothing written, nothing replaced
    (tmp_path / "a-file").write_text("x")
    assert main(["export", str(run_id), "--out", str(tmp_path / "a-file"), "--db", db]) == 2
    assert main(["export", str(run_id), "--out", str(out), "--db", db, "--force"]) == 0
    assert (out / "adapter_config.json").exists() and (out / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(run_id), "--out", str(empty), "--db", db]) == 0


def test_a_corrupt_checkpoint_is_one_line_from_export(tmp_path, base, capsys):
    db, run_id, _ = _fedavg_run(tmp_path, base)
    (path,) = (tmp_path / "ckpt").rglob("*.npz")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    assert main(["export", str(run_id), "--out", str(tmp_path / "o"), "--db", db]) == 2
    out = capsys.readouterr().out
    assert "sha256" in out and path.name in out and "Traceback" not in out


def test_export_refuses_a_database_that_does_not_exist(tmp_path, capsys):
    db = f"sqlite:///{tmp_path}/typo/runs.db"
    assert main(["export", "1", "--out", str(tmp_path / "o"), "--db", db]) == 2
    assert "does not exist" in capsys.readouterr().out
    assert not (tmp_path / "typo").exists()


# --- exports a PEFT user loads by name -------------------------------------------------------


def _fedavg_over_ranks(base, ranks=(4, 8, 16), max_rank=64):
    """FedAvg's state after one real aggregation of clients at ``ranks`` (global rank ``max_rank``)."""
    spec = ModelSpec(modules=module_shapes(base.model, TARGETS), max_rank=max_rank, seed=0)
    agg = aggregation.create("fedavg")
    rng = np.random.default_rng(5)
    updates = [ClientUpdate(node_id=f"n{r}", num_examples=10 + r, rank=r, alpha=float(r),
                            tensors={m: {"A": rng.normal(size=(r, s.d_in)), "B": rng.normal(size=(s.d_out, r)) * 0.1}
                                     for m, s in spec.modules.items()})
               for r in ranks]
    return agg.aggregate(agg.init_state(spec), updates).state


def _outcomes(nodes, eps=None):
    return tuple(ClientOutcome(n, "ok", rank=4, num_examples=10, train_loss=1.0, seconds=1.0, bytes_down=1,
                               bytes_up=1, metrics={} if eps is None else {"dp-epsilon": eps, "dp-delta": 1e-5})
                 for n in nodes)


def test_a_fedavg_run_over_ranks_4_8_16_exports_at_rank_16_not_64(tmp_path, base):
    state = _fedavg_over_ranks(base)
    db, run_id, c = _run_with_checkpoint(tmp_path, base, "fedavg", state, [])
    result = export_run(db, run_id, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert result.rank == 16 and config["r"] == 16 and config["lora_alpha"] == 16
    assert config["task_type"] == "CAUSAL_LM"
    loaded = PeftModel.from_pretrained(copy.deepcopy(base.model), tmp_path / "out")
    torch.testing.assert_close(_logits(loaded), _logits(platform_model(base.model, c)), atol=1e-4, rtol=1e-4)
    weights = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert {tuple(w.shape) for k, w in weights.items() if "lora_A" in k} == {(16, 32)}


def test_trimming_drops_only_exactly_zero_terms():
    rng = np.random.default_rng(0)
    b, a = rng.normal(size=(6, 5)), rng.normal(size=(5, 4))
    b[:, 1] = 0  # component 1: B column zero, A row not (FedAvg's untouched init)
    a[3] = 0  # component 3: A row zero
    assert used_components(b, a).tolist() == [0, 2, 4]
    (factors, error) = truncated_adapter({"m": [(b, a)]}, None)
    assert error == 0.0 and factors["m"]["B"].shape == (6, 3)
    np.testing.assert_allclose(factors["m"]["B"] @ factors["m"]["A"], b @ a)


def test_an_export_of_a_local_base_loads_with_auto_peft_offline(tmp_path, base, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local = tmp_path / "my-base"
    base.model.save_pretrained(local)
    base.tokenizer.save_pretrained(local)
    state = _fedavg_over_ranks(base, ranks=(4, 8), max_rank=16)
    db, run_id, c = _run_with_checkpoint(tmp_path, base, "fedavg", state, [], model=str(local))
    export_run(db, run_id, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(local.resolve()) and config["r"] == 8
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(_logits(loaded), _logits(platform_model(base.model, c)), atol=1e-4, rtol=1e-4)
    assert AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab() == base.tokenizer.get_vocab()


def test_an_export_of_the_in_memory_tiny_preset_carries_its_base(tmp_path, base, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    db, run_id, c = _run_with_checkpoint(tmp_path, base, "fedavg", _fedavg_over_ranks(base), [])
    export_run(db, run_id, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "out" / "base-model").resolve())
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(_logits(loaded), _logits(platform_model(base.model, c)), atol=1e-4, rtol=1e-4)


def test_a_preset_with_a_hub_id_is_named_by_it_and_the_card_says_which_run(tmp_path, base, monkeypatch):
    # SmolLM2 without converting it here: the tiny weights, labelled as the preset labels SmolLM2
    stand_in = dataclasses.replace(base, name="smollm2", label="SmolLM2-135M-Instruct", hub_id=SMOLLM2_HUB_ID,
                                   path=tmp_path / "cache" / "smollm2")
    monkeypatch.setattr("server.export.load_base", lambda name: stand_in)
    extra = {"num-server-rounds": 3, "clients-per-round": 2, "dp-epsilon": 4.0}
    db, run_id, _ = _run_with_checkpoint(tmp_path, base, "fedavg", _fedavg_over_ranks(base), [], model="smollm2",
                                         outcomes=_outcomes([101, 102], eps=1.25), extra_config=extra)
    assert main(["export", str(run_id), "--out", str(tmp_path / "out"), "--db", db]) == 0
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert not (tmp_path / "out" / "base-model").exists()
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlibrary_name: peft\n")
    for fact in (f"# fedlora run {run_id}: fedavg, adapter", "| aggregator | fedavg |", "| rounds | 1 of 3",
                 "| clients | 2 distinct nodes aggregated; 2 sampled per round", "rank 16",
                 "local DP-SGD: ε ≤ 1.250 at δ = 1e-05 (the largest of 2 clients' ε)", "AutoPeftModelForCausalLM",
                 "dequantised", str(tmp_path / "cache" / "smollm2")):
        assert fact in card, fact

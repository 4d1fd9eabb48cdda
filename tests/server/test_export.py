"""Exported adapters load with PEFT and reproduce the platform's global model."""

import copy

import numpy as np
import pytest
import torch
from peft import PeftModel

import aggregation
from aggregation.base import ModelSpec
from core.model import module_shapes
from core.presets import load_base
from server import checkpoint as ckpt
from cli.app import main
from server.db.session import open_database
from server.export import export_run, platform_model
from server.recording import RunRecorder, SavedCheckpoint
from server.rounds import RoundReport

TARGETS = ("q_proj", "v_proj")
IDS = torch.tensor([[3, 17, 42, 99, 5, 250, 7]])


@pytest.fixture(scope="module")
def base():
    return load_base("tiny")


def _run_with_checkpoint(tmp_path, base, aggregator: str, state, merge_log):
    db = f"sqlite:///{tmp_path}/runs.db"
    recorder = RunRecorder(open_database(db))
    config = {"model": "tiny", "target-modules": ",".join(TARGETS), "aggregator": aggregator}
    run_id = recorder.start_run(config=config, aggregator=aggregator, model="tiny", tag="", flwr_run_id=None)
    c = ckpt.Checkpoint(round=len(merge_log) or 1, aggregator=aggregator, state=state, merge_log=merge_log,
                        rng_state=np.random.default_rng(0).bit_generator.state, config=config)
    path, sha = ckpt.save(c, recorder.checkpoint_directory(run_id, tmp_path / "ckpt"))
    from datetime import datetime

    report = RoundReport(number=c.round, started_at=datetime.now(), finished_at=datetime.now(), outcomes=(),
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

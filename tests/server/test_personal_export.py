"""``fedlora export RUN --node NAME``: a node's personalised adapter = the shared A + its own B."""

from __future__ import annotations

import copy
from datetime import datetime

import numpy as np
import pytest
import torch
from peft import PeftModel

import aggregation
from aggregation.base import ModelSpec
from cli.app import main
from core.model import AdaptedModel, AdapterSpec, module_shapes
from core.personal import PersonalFactors, PersonalStore
from core.presets import load_base
from server import checkpoint as ckpt
from server.db.session import open_database
from server.personal_export import export_personal
from server.recording import RunRecorder, SavedCheckpoint
from server.rounds import RoundReport

TARGETS = ("q_proj", "v_proj")
IDS = torch.tensor([[3, 17, 42, 99, 5, 250, 7]])


@pytest.fixture(scope="module")
def base():
    return load_base("tiny")


def _fedsa_run(tmp_path, base, tag="tag7"):
    spec = ModelSpec(modules=module_shapes(base.model, TARGETS), max_rank=8, seed=0)
    agg = aggregation.create("fedsa-lora")
    state = agg.init_state(spec)
    db = f"sqlite:///{tmp_path}/runs.db"
    recorder = RunRecorder(open_database(db))
    config = {"model": "tiny", "target-modules": ",".join(TARGETS), "aggregator": "fedsa-lora", "run-tag": tag}
    run_id = recorder.start_run(config=config, aggregator="fedsa-lora", model="tiny", tag=tag, flwr_run_id=None)
    c = ckpt.Checkpoint(round=1, aggregator="fedsa-lora", state=state, merge_log=[],
                        rng_state=np.random.default_rng(0).bit_generator.state, config=config)
    path, sha = ckpt.save(c, recorder.checkpoint_directory(run_id, tmp_path / "ckpt"))
    report = RoundReport(number=1, started_at=datetime.now(), finished_at=datetime.now(), outcomes=(),
                         aggregated=True, train_loss=None, relative_error=None, aggregate_seconds=0.0)
    recorder.record_round(run_id, report, None, SavedCheckpoint(path, sha, c.config_hash))
    return db, run_id, state


def test_the_export_is_the_nodes_model_shared_a_with_its_own_b(tmp_path, base):
    db, run_id, state = _fedsa_run(tmp_path, base)
    rng = np.random.default_rng(1)
    rank, alpha = 4, 8.0
    kept = {m: {"B": (0.1 * rng.normal(size=(s.d_out, rank))).astype(np.float32)}
            for m, s in module_shapes(base.model, TARGETS).items()}
    PersonalStore(directory=tmp_path / "personal", run_key="tag7", node="partition-2").save(
        PersonalFactors(tensors=kept, rank=rank, alpha=alpha, server_round=1))
    out = tmp_path / "out"
    assert main(["export", str(run_id), "--out", str(out), "--db", db, "--node", "partition-2",
                 "--personal-dir", str(tmp_path / "personal")]) == 0
    # the node's own model: its rank-4 adapter with the shared A[:4] and its B, at its alpha
    node_model = AdaptedModel(copy.deepcopy(base.model), AdapterSpec(kind="lora", rank=rank, alpha=alpha,
                                                                     targets=TARGETS))
    node_model.load({m: {"A": state.factors[m]["A"][:rank], "B": kept[m]["B"]} for m in kept})
    loaded = PeftModel.from_pretrained(copy.deepcopy(base.model), out)
    with torch.no_grad():
        want, got, plain = (m(input_ids=IDS).logits for m in (node_model.model, loaded, base.model))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)  # B does something


def test_a_node_without_personal_factors_is_an_error_naming_the_file(tmp_path, base):
    db, run_id, _ = _fedsa_run(tmp_path, base)
    with pytest.raises(ValueError, match=r"no personal factors of node 'nobody' .*nobody.npz"):
        export_personal(db, run_id, "nobody", tmp_path / "out", directory=tmp_path / "personal")

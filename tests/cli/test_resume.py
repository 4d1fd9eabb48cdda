"""Resume continues a checkpoint only under the config it was written with (issue 11, item 5).

The rounds so far ran with the checkpoint's config. An edited ``runs`` row (or another
submission) used to be accepted: a different learning rate gave one recorded run that
is two experiments, another aggregator crashed after a client had trained. Both
``fedlora resume`` (before any SuperLink starts) and the ServerApp refuse, naming the keys.
"""

from __future__ import annotations

from datetime import datetime
from types import SimpleNamespace

import numpy as np
import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

import aggregation
from server import app as server_app
from server import checkpoint as ckpt
from cli import app as cli
from cli import simulate
from core.config import RunConfig
from server.db.models import Run
from server.db.session import open_database
from server.recording import RunRecorder, SavedCheckpoint
from server.rounds import RoundReport
from tests.aggregation.harness import spec


def _interrupted_run(tmp_path) -> tuple[str, int, dict]:
    """A simulation run interrupted after round 1, with its checkpoint, as the ServerApp records it."""
    db = f"sqlite:///{tmp_path}/runs.db"
    config = RunConfig(model="tiny", aggregator="flora", learning_rate=0.05, ranks="2,4", max_rank=8,
                       simulation_nodes=2, clients_per_round=2, db_url=db, run_tag="t",
                       checkpoint_dir=str(tmp_path / "ckpt")).to_flower()
    recorder = RunRecorder(open_database(db))
    run_id = recorder.start_run(config=config, aggregator="flora", model="tiny", tag="t", flwr_run_id=None)
    checkpoint = ckpt.Checkpoint(round=1, aggregator="flora", state=aggregation.create("flora").init_state(spec(8)),
                                 merge_log=[], rng_state=np.random.default_rng(0).bit_generator.state, config=config)
    path, sha = ckpt.save(checkpoint, recorder.checkpoint_directory(run_id, tmp_path / "ckpt"))
    now = datetime(2026, 1, 1)
    report = RoundReport(number=1, started_at=now, finished_at=now, outcomes=(), aggregated=True,
                         train_loss=None, relative_error=None, aggregate_seconds=0.0)
    recorder.record_round(run_id, report, None, SavedCheckpoint(path, sha, checkpoint.config_hash))
    recorder.finish_run(run_id, status="interrupted", error="stopped by the user")
    return db, run_id, config


def _edit_row(db: str, run_id: int, **changes) -> dict:
    engine = open_database(db)
    with Session(engine) as s:
        edited = {**s.get(Run, run_id).config, **changes}
    with engine.begin() as conn:
        conn.execute(update(Run).where(Run.id == run_id).values(config=edited))
    return edited


@pytest.fixture
def launches(monkeypatch) -> list:
    """Every call that would start a SuperLink; a refusal must leave this empty."""
    calls: list = []
    monkeypatch.setitem(simulate.ENGINES, "flower", lambda *a, **k: calls.append(a) or 0)
    return calls


@pytest.mark.parametrize("key, value", [("learning-rate", 0.5), ("aggregator", "fedavg")])
def test_resume_refuses_a_row_edited_since_the_checkpoint_naming_the_key(tmp_path, capsys, launches, key, value):
    db, run_id, config = _interrupted_run(tmp_path)
    _edit_row(db, run_id, **{key: value})
    assert cli.main(["resume", str(run_id), "--db", db, "--home", str(tmp_path / "h")]) == 2
    out = capsys.readouterr().out.replace("\n", "")
    assert f"{key}: {config[key]!r} -> {value!r}" in out and "round-00001.npz" in out and "Traceback" not in out
    assert not launches and not (tmp_path / "h").exists()


def test_resume_of_an_unedited_row_goes_ahead(tmp_path, launches):
    db, run_id, _ = _interrupted_run(tmp_path)
    _edit_row(db, run_id, **{"round-timeout": 60.0})  # a volatile key may differ
    assert cli.main(["resume", str(run_id), "--db", db, "--home", str(tmp_path / "h")]) == 0
    assert len(launches) == 1


def test_resume_of_a_mistyped_database_path_creates_nothing(tmp_path, capsys, launches):
    assert cli.main(["resume", "1", "--db", f"sqlite:///{tmp_path}/typo/runs.db"]) == 2
    assert "does not exist" in capsys.readouterr().out and not (tmp_path / "typo").exists() and not launches


def test_the_server_app_refuses_a_config_other_than_its_checkpoints(tmp_path, monkeypatch):
    # a submission with resume-run-id whose config matches the (edited) row passes the
    # row check; the checkpoint's own config is the second line of defence
    db, run_id, _ = _interrupted_run(tmp_path)
    edited = _edit_row(db, run_id, **{"learning-rate": 0.5})

    def build_strategy(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setattr(server_app, "build_strategy", build_strategy)
    context = SimpleNamespace(run_config={**edited, "resume-run-id": run_id}, run_id=None)
    with pytest.raises(ValueError, match="learning-rate: 0.05 -> 0.5"):
        server_app.main(None, context)
    with Session(open_database(db)) as s:
        run = s.get(Run, run_id)
        assert run.status == "failed" and "learning-rate" in run.error

"""Every registered aggregator, end to end through the real ServerApp and ClientApp (in process).

2 rounds, 3 nodes of ranks 2/4/8 on the tiny model, server-side and federated evaluation
on: each run's record is checked as a user would read it. The same runs on Flower's own
engines are tests/integration (FedAvg, FLoRA, resume, DP, deployment) and the quick
quality benchmark (tests/simulations).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

import aggregation
from server import checkpoint as ckpt
from server.db.models import CheckpointRecord, ClientUpdateRecord, Evaluation, FederatedEvaluation, RoundRecord, Run
from server.db.session import open_database
from tests import inprocess

SETTINGS = dict(model="tiny", num_server_rounds=2, clients_per_round=3, ranks="2,4,8", max_rank=8, local_steps=2,
                batch_size=4, max_seq_len=48, eval_examples=8, eval_every=1, fraction_evaluate=1.0,
                node_eval_fraction=0.2, partition="iid")


@pytest.mark.parametrize("name", aggregation.names())
def test_a_run_records_every_round_client_and_evaluation(tmp_path, name):
    db = f"sqlite:///{tmp_path}/runs.db"
    grid = inprocess.run(num_nodes=3, aggregator=name, db_url=db, checkpoint_dir=str(tmp_path / "ckpt"),
                         dp_state_dir=str(tmp_path / "privacy"), **SETTINGS)
    with Session(open_database(db)) as s:
        (run,) = s.scalars(select(Run)).all()
        assert (run.status, run.error) == ("completed", None)
        rounds = s.scalars(select(RoundRecord).order_by(RoundRecord.number)).all()
        assert [(r.number, r.num_aggregated) for r in rounds] == [(1, 3), (2, 3)]
        updates = s.scalars(select(ClientUpdateRecord)).all()
        assert sorted((u.round_number, u.status, u.rank) for u in updates) == [
            (r, "ok", k) for r in (1, 2) for k in (2, 4, 8)]
        assert all(u.num_examples > 0 and math.isfinite(u.train_loss) and u.bytes_up > 0 for u in updates)
        evals = s.scalars(select(Evaluation).order_by(Evaluation.round_number)).all()
        assert [e.round_number for e in evals] == [0, 1, 2] and all(math.isfinite(e.loss) for e in evals)
        federated = s.scalars(select(FederatedEvaluation).order_by(FederatedEvaluation.round_number)).all()
        assert [(f.round_number, f.nodes, f.failed) for f in federated] == [(1, 3, 0), (2, 3, 0)]
        assert all(math.isfinite(f.loss) for f in federated)
        row = s.scalars(select(CheckpointRecord).where(CheckpointRecord.round_number == 2)).one()
    assert ckpt.load(Path(row.path), row.sha256).round == 2
    types = {m.metadata.message_type for m in grid.delivered}
    assert {"query", "train", "evaluate"} <= types

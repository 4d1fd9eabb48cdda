"""Real runs on Flower's simulation engine (SuperLink + Ray), tiny model, CPU."""

import math

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from cli.app import main
from server.db.models import ClientUpdateRecord, Evaluation, Run
from server.db.session import open_database

pytestmark = pytest.mark.integration

BASE_ARGS = ["--model", "tiny", "--max-rank", "16", "--num-clients", "3", "--clients-per-round", "3", "--ranks", "2,4,8",
             "--local-steps", "3", "--lr", "0.05", "--eval-examples", "16", "--max-seq-len", "64"]


def simulate(tmp_path, *extra: str) -> tuple[int, str]:
    db = f"sqlite:///{tmp_path}/runs.db"
    code = main(["simulate", *BASE_ARGS, "--db", db, "--home", str(tmp_path / "flwr"), *extra])
    return code, db


def test_fedavg_simulation_records_every_round_and_client(tmp_path):
    code, db = simulate(tmp_path, "--rounds", "2")
    assert code == 0
    with Session(open_database(db)) as s:
        (run,) = s.scalars(select(Run)).all()
        assert run.status == "completed" and run.aggregator == "fedavg"
        assert [r.number for r in run.rounds] == [1, 2]
        updates = s.scalars(select(ClientUpdateRecord)).all()
        assert len(updates) == 6 and {u.status for u in updates} == {"ok"}
        # each node keeps its own rank, and the three ranks are the configured ones
        by_node = {}
        for u in updates:
            by_node.setdefault(u.node_id, set()).add(u.rank)
        assert sorted(r for (r,) in map(tuple, by_node.values())) == [2, 4, 8]
        assert all(int(u.node_id) >= 0 and u.bytes_up > 0 and u.bytes_down > 0 for u in updates)
        assert all(math.isfinite(u.train_loss) for u in updates)
        evals = {e.round_number: e.loss for e in s.scalars(select(Evaluation))}
        assert sorted(evals) == [0, 1, 2]
        assert evals[2] < evals[0], evals
        assert all(r.relative_error is not None and r.relative_error >= 0 for r in run.rounds)


# Every other aggregator runs end to end in tests/simulations/test_bench_quality.py
# (the quick quality benchmark), which checks the same rows for each of them.

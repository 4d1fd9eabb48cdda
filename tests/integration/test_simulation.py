"""Real runs on Flower's simulation engine (SuperLink + Ray), tiny model, CPU."""

import math

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from cli.app import main
from server.db.models import ClientUpdateRecord, Evaluation, FederatedEvaluation, NodeEvaluation, Run
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
        assert sorted(evals) == [0, 2]  # eval-every 2: round 0 and the last round
        assert evals[2] < evals[0], evals
        assert all(r.relative_error is not None and r.relative_error >= 0 for r in run.rounds)


def test_federated_evaluation_without_server_data_records_every_node(tmp_path):
    code, db = simulate(tmp_path, "--rounds", "2", "--eval-examples", "0", "--fraction-evaluate", "1",
                        "--eval-every", "1", "--node-eval-fraction", "0.2")
    assert code == 0
    with Session(open_database(db)) as s:
        (run,) = s.scalars(select(Run)).all()
        assert run.status == "completed"
        assert s.scalars(select(Evaluation)).all() == []  # the coordinator holds no data here
        nodes = s.scalars(select(NodeEvaluation)).all()
        assert sorted((n.round_number, n.status) for n in nodes) == [(1, "ok")] * 3 + [(2, "ok")] * 3
        for number in (1, 2):
            rows = [n for n in nodes if n.round_number == number]
            (agg,) = s.scalars(select(FederatedEvaluation).where(FederatedEvaluation.round_number == number)).all()
            weighted = sum(n.loss * n.num_examples for n in rows) / sum(n.num_examples for n in rows)
            assert agg.loss == pytest.approx(weighted, rel=1e-12) and agg.nodes == 3
            assert agg.perplexity == pytest.approx(math.exp(weighted), rel=1e-12)
            assert agg.worst_loss == max(n.loss for n in rows) and agg.best_loss == min(n.loss for n in rows)
        # a node's held-out slice (0.2 of its data) is not what it trained on: the two counts add up
        # to its partition, and training reported only the rest
        updates = s.scalars(select(ClientUpdateRecord)).all()
        for n in nodes:
            (u,) = [u for u in updates if u.round_number == n.round_number and u.node_id == n.node_id]
            # 0.2 of the partition, the cut moved to the nearer end of a group of copies it would split
            # (tests/core/test_data.py checks the exact rule; chatterbot repeats one row 121 times)
            expected = max(1, round((n.num_examples + u.num_examples) * 0.2))
            assert abs(n.num_examples - expected) <= 121 / 2, (n.num_examples, u.num_examples)


# Every aggregator runs end to end through the real ServerApp and ClientApp in
# tests/server/test_every_aggregator.py (in process), which checks the same rows for each.

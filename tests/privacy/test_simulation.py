"""One real 2-round simulation with DP-SGD: a node whose budget is spent declines, the
database says why, the others report their ε, and the summary shows the maximum. The
same run has central DP on (clients clip, the wrapped aggregator adds noise), so that
wiring is exercised end to end too."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.data import load_examples, partition, split_heldout
from privacy.accounting import epsilon
from privacy.ledger import PrivacyLedger, dataset_fingerprint
from cli.app import main
from server.db.models import ClientUpdateRecord, Run
from server.db.session import open_database

pytestmark = pytest.mark.integration

TARGET = 3.0
SPENT = ((0.6, 0.1, 400),)  # what an earlier run already spent on partition 0's data


def test_exhausted_node_declines_and_the_database_says_why(tmp_path, capsys):
    state_dir = tmp_path / "privacy"
    train_split, _ = split_heldout(load_examples("chatterbot"), 0.1, 0)
    part0 = partition(train_split, "topic", 3, 0)[0]
    ledger = PrivacyLedger(directory=state_dir, node="partition-0", dataset=dataset_fingerprint(part0))
    ledger.save(ledger.empty().with_history(SPENT))
    spent = epsilon(SPENT, delta=1e-5, accountant="prv")
    assert spent > TARGET

    db = f"sqlite:///{tmp_path}/runs.db"
    code = main([
        "simulate", "--model", "tiny", "--max-rank", "16", "--num-clients", "3", "--clients-per-round", "3",
        "--ranks", "2,4,8", "--local-steps", "3", "--lr", "0.05", "--eval-examples", "8", "--max-seq-len", "48",
        "--rounds", "2", "--db", db, "--home", str(tmp_path / "flwr"),
        "--dp-epsilon", str(TARGET), "--dp-max-grad-norm", "1.0", "--dp-state-dir", str(state_dir),
        "--dp-central-clip", "1.0", "--dp-central-noise", "0.1",
    ])
    out = capsys.readouterr().out
    assert code == 0, out
    with Session(open_database(db)) as s:
        (run,) = s.scalars(select(Run)).all()
        assert run.status == "completed"
        assert [r.num_aggregated for r in run.rounds] == [2, 2]
        # central DP's user-level ε, accounted per round at q = 3 of 3 nodes, z = 0.1
        assert [r.central_epsilon for r in run.rounds] == pytest.approx(
            [epsilon(((0.1, 1.0, n),), delta=1e-5, accountant="prv") for n in (1, 2)], rel=1e-9)
        rows = s.scalars(select(ClientUpdateRecord).order_by(ClientUpdateRecord.round_number)).all()
    declined = [r for r in rows if r.status == "declined"]
    ok = [r for r in rows if r.status == "ok"]
    assert len(declined) == 2 and len(ok) == 4, [(r.status, r.reason) for r in rows]
    assert len({r.node_id for r in declined}) == 1  # partition 0, both rounds
    for row in declined:
        assert row.reason.startswith("budget exhausted: ε would reach ")
        assert row.reason.endswith(f"> target {TARGET:g}")
        assert row.metrics["dp-epsilon"] == pytest.approx(spent) and row.metrics["dp-steps"] == 0
    for row in ok:
        m = row.metrics
        assert m["dp-steps"] == 3 and m["dp-noise-multiplier"] > 0 and 0 < m["dp-sample-rate"] <= 1
        assert m["dp-delta"] == 1e-5 and 0 < m["dp-epsilon-delta"] <= m["dp-epsilon"] <= TARGET
    final = [r.metrics["dp-epsilon"] for r in ok if r.round_number == 2]
    assert all(TARGET - 0.05 <= e <= TARGET for e in final)  # calibrated to use the budget by the end
    assert f"DP: max ε across clients {spent:.4g}" in out


def test_central_budget_stops_the_run_before_the_round_that_would_pass_it(tmp_path, capsys):
    # 3 nodes, 3 per round: q = 1. The budget lies between ε after 2 rounds and after 3, so
    # rounds 1 and 2 run, round 3 never starts, and MLflow holds the same two rounds.
    from mlflow.tracking import MlflowClient

    from cli.progress import EXIT_STOPPED
    from server.db.models import RoundRecord

    sigma, delta = 1.0, 1e-5
    after = [epsilon(((sigma, 1.0, n),), delta=delta, accountant="rdp") for n in (1, 2, 3)]
    budget = (after[1] + after[2]) / 2
    db, uri = f"sqlite:///{tmp_path}/runs.db", f"sqlite:///{tmp_path}/mlflow.db"
    code = main([
        "simulate", "--model", "tiny", "--max-rank", "16", "--num-clients", "3", "--clients-per-round", "3",
        "--ranks", "2,4,8", "--local-steps", "2", "--eval-examples", "4", "--max-seq-len", "32", "--rounds", "3",
        "--db", db, "--home", str(tmp_path / "flwr"), "--checkpoint-dir", str(tmp_path / "ckpt"),
        "--dp-central-clip", "1.0", "--dp-central-noise", str(sigma), "--dp-central-epsilon", str(budget),
        "--dp-accountant", "rdp", "--mlflow-uri", uri,
    ])
    out = capsys.readouterr().out
    assert code == EXIT_STOPPED, out
    assert "affords 2 of 3 rounds" in out and "the run stops before round 3" in out  # said before it started
    with Session(open_database(db)) as s:
        (run,) = s.scalars(select(Run)).all()
        rounds = s.scalars(select(RoundRecord).order_by(RoundRecord.number)).all()
    assert run.status == "stopped" and "round 3 would bring user-level ε" in run.error
    assert [r.number for r in rounds] == [1, 2]
    assert [r.central_epsilon for r in rounds] == pytest.approx(after[:2], rel=1e-9)
    assert "run stopped" in out and f"central DP: user-level ε {after[1]:.4g}" in out
    assert main(["resume", str(run.id), "--db", db, "--home", str(tmp_path / "flwr")]) == 2  # would stop at once
    refused = capsys.readouterr().out.replace("\n", " ")
    assert f"run {run.id} stopped: central DP budget exhausted: round 3 would bring user-level ε" in refused, refused
    assert "Resuming it would stop again" in refused

    client = MlflowClient(tracking_uri=uri)
    (mlrun,) = client.search_runs([client.get_experiment_by_name("fedlora").experiment_id])
    assert mlrun.info.run_name.startswith(f"fedlora-{run.id}-") and mlrun.data.tags["fedlora.status"] == "stopped"
    assert mlrun.data.params["dp-central-epsilon"] == str(budget)
    history = client.get_metric_history(mlrun.info.run_id, "dp_central_epsilon")
    assert [(m.step, m.value) for m in history] == [(1, pytest.approx(after[0])), (2, pytest.approx(after[1]))]
    assert {m.step for m in client.get_metric_history(mlrun.info.run_id, "train_loss")} == {1, 2}

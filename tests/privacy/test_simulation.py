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

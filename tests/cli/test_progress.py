"""What ``simulate`` prints and returns is what the database holds: no "done" over a failed client."""

from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy.orm import Session

from cli import app, progress, simulate
from core.config import RunConfig
from server.db.models import Run
from server.db.session import open_database
from server.recording import RunRecorder
from server.rounds import ClientOutcome, RoundReport


def _recorded_run(tmp_path, outcomes: tuple[ClientOutcome, ...]) -> tuple[object, int]:
    engine = open_database(f"sqlite:///{tmp_path}/r.db")
    recorder = RunRecorder(engine)
    run_id = recorder.start_run(config={}, aggregator="fedavg", model="tiny", tag="t", flwr_run_id=1)
    now = datetime(2026, 1, 1)
    recorder.record_round(run_id, RoundReport(
        number=1, started_at=now, finished_at=now, outcomes=outcomes, aggregated=True, train_loss=1.0,
        relative_error=0.0, aggregate_seconds=0.0,
    ), None)
    recorder.finish_run(run_id, status="completed")
    return engine, run_id


def _summarize(engine, run_id: int, tmp_path) -> int:
    with Session(engine) as session:
        run = session.get(Run, run_id)
        session.expunge(run)
    cfg = RunConfig(model="tiny", db_url=f"sqlite:///{tmp_path}/r.db")
    return progress.summarize(engine, cfg, run, elapsed=1.0, log_path=tmp_path / "flower.log")


OK = ClientOutcome(11, "ok", rank=4, num_examples=10, train_loss=1.0, seconds=1.0)


def test_every_client_that_did_not_train_is_listed_under_its_round(tmp_path):
    engine, run_id = _recorded_run(tmp_path, (
        OK,
        ClientOutcome(22, "failed", reason="privacy accounting mismatch:\n the accountant [recorded] x", rank=2),
        ClientOutcome(33, "declined", reason="privacy budget exhausted", rank=8),
    ))
    with Session(engine) as session:
        (row,) = progress.round_rows(session, run_id)
    lines = row.splitlines()
    assert lines[0].split()[:2] == ["1", "1/3"]
    # one line each, node, rank, status and the reason flattened onto the line
    assert lines[1].split() == ["node", "22", "(rank", "2):", "failed:", "privacy", "accounting", "mismatch:",
                                "the", "accountant", "[recorded]", "x"]
    assert "node 33 (rank 8): declined: privacy budget exhausted" in lines[2]
    assert len(lines) == 3  # the ok client gets no line of its own


@pytest.mark.parametrize("status", ["failed", "rejected"])
def test_a_completed_run_with_a_failed_client_is_not_done(tmp_path, capsys, status):
    engine, run_id = _recorded_run(tmp_path, (OK, ClientOutcome(22, status, reason="boom", rank=2)))
    code = _summarize(engine, run_id, tmp_path)
    out = capsys.readouterr().out
    assert code == progress.EXIT_CLIENT_FAILURES != 0
    assert "done" not in out and "completed with 1 failed client reply" in out


def test_a_declined_client_does_not_fail_the_run(tmp_path, capsys):
    # a node that declines (its DP budget is spent) did exactly what the record says
    engine, run_id = _recorded_run(tmp_path, (OK, ClientOutcome(22, "declined", reason="budget", rank=2)))
    assert _summarize(engine, run_id, tmp_path) == 0
    assert "done" in capsys.readouterr().out


def test_clients_per_round_above_the_client_count_is_printed_and_recorded(tmp_path, capsys, monkeypatch):
    seen: dict[str, object] = {}

    def fake_run(cfg, engine, federation, *, home):
        seen["cfg"] = cfg
        return 0

    monkeypatch.setattr(simulate, "run_on_simulation_engine", fake_run)
    code = app.main(["simulate", "--model", "tiny", "--num-clients", "2", "--clients-per-round", "5",
                     "--ranks", "2,4", "--max-rank", "8", "--db", f"sqlite:///{tmp_path}/x.db"])
    assert code == 0
    assert "--clients-per-round 5 > --num-clients 2: 2 clients per round" in capsys.readouterr().out
    assert seen["cfg"].clients_per_round == 2  # the header and the record say what really trains


def test_fedlora_run_with_its_database_exits_3_over_a_failed_client(tmp_path, capsys):
    # Flower reports a deployment run "completed" whatever its clients did; with --db the
    # record is read back and decides, as simulate's closing lines do
    from cli.submit import client_outcome

    engine, run_id = _recorded_run(tmp_path, (OK, ClientOutcome(22, "failed", reason="out of memory", rank=2)))
    code = client_outcome(f"sqlite:///{tmp_path}/r.db", "t", 77)
    out = capsys.readouterr().out
    assert code == progress.EXIT_CLIENT_FAILURES
    assert "node 22 (rank 2): failed: out of memory" in out and "completed with 1 failed client reply" in out


def test_fedlora_run_with_its_database_exits_0_when_every_client_trained(tmp_path, capsys):
    from cli.submit import client_outcome

    _recorded_run(tmp_path, (OK,))
    assert client_outcome(f"sqlite:///{tmp_path}/r.db", "t", 77) == 0
    assert "run 77 completed" in capsys.readouterr().out

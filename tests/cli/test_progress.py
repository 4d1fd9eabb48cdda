"""What ``simulate`` prints and returns is what the database holds: no "done" over a failed client."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy.orm import Session

from cli import app, progress, simulate
from core.config import RunConfig
from server.db.models import Run
from server.db.session import open_database
from server.recording import RunRecorder
from server.rounds import ClientOutcome, RoundReport, utcnow


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

    monkeypatch.setitem(simulate.ENGINES, "flower", fake_run)
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


# --- live progress (a terminal) and plain lines (CI, logs) ----------------------------------


class _Process:
    """A Flower process that runs for ``polls`` polls, recording one round before each."""

    def __init__(self, recorder: RunRecorder, run_id: int, rounds: int) -> None:
        self.recorder, self.run_id, self.left, self.number = recorder, run_id, rounds, 0

    def poll(self) -> int | None:
        if self.left == 0:
            return 0
        self.left -= 1
        self.number += 1
        start = utcnow() - timedelta(seconds=20)  # the recorder stamps finished_at itself: a 20 s round
        self.recorder.record_round(self.run_id, RoundReport(
            number=self.number, started_at=start, finished_at=utcnow(), outcomes=(OK,),
            aggregated=True, train_loss=1.0, relative_error=0.0, aggregate_seconds=0.0), None)
        return None


def _following(tmp_path, display_for, rounds_recorded: int, total: int):
    engine = open_database(f"sqlite:///{tmp_path}/f.db")
    recorder = RunRecorder(engine)
    run_id = recorder.start_run(config={}, aggregator="fedavg", model="tiny", tag="live", flwr_run_id=1)
    display = display_for(total)
    run = progress.follow(engine, "live", _Process(recorder, run_id, rounds_recorded), total, interval=0.0,
                          display=display)
    return run, display


def test_on_a_terminal_a_live_line_shows_rounds_clients_elapsed_and_eta(tmp_path):
    import io

    from rich.console import Console

    out = io.StringIO()
    terminal = Console(file=out, force_terminal=True, width=160, highlight=False)
    run, display = _following(tmp_path, lambda total: progress.LiveDisplay(terminal, total), 2, 5)
    assert run is not None and run.tag == "live"
    task = display.progress.tasks[0]
    assert (task.completed, task.total) == (2, 5)
    assert task.fields["clients"] == "round 2: 1/1 clients aggregated"
    assert task.fields["eta"] in ("0:01:00", "0:01:01")  # 3 rounds left at the recorded 20 s each
    assert task.description == "round 3/5 running"
    text = out.getvalue()
    assert "\x1b[" in text  # drawn as a live display, not as lines
    import re

    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "\n")
    lines = plain.splitlines()
    assert lines.count(progress.HEADER) == 1  # the rows go above the live line, each once
    assert [line.split()[:2] for line in lines if line.startswith("      ")] == [["1", "1/1"], ["2", "1/1"]]
    assert "2/5 rounds | round 2: 1/1 clients aggregated | elapsed" in plain and "ETA 0:01:0" in plain


def test_without_a_terminal_the_output_is_the_plain_rows(tmp_path, capsys):
    from cli.console import console

    assert not console.is_terminal  # pytest captures stdout, as CI and log files do
    _following(tmp_path, lambda total: progress.PlainDisplay(console, total), 3, 3)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == progress.HEADER
    assert [line.split()[:2] for line in lines[1:]] == [["1", "1/1"], ["2", "1/1"], ["3", "1/1"]]
    assert all("\x1b" not in line for line in lines)


def test_follow_chooses_plain_lines_when_stdout_is_not_a_terminal(tmp_path, capsys):
    engine = open_database(f"sqlite:///{tmp_path}/f.db")
    recorder = RunRecorder(engine)
    run_id = recorder.start_run(config={}, aggregator="fedavg", model="tiny", tag="plain", flwr_run_id=1)
    progress.follow(engine, "plain", _Process(recorder, run_id, 1), 1, interval=0.0)
    out = capsys.readouterr().out
    assert out.splitlines()[0] == progress.HEADER and "\x1b" not in out


def test_eta_is_the_mean_round_times_the_rounds_left_less_the_current_one():
    now = datetime(2026, 1, 1)

    class _Row:
        def __init__(self, seconds: int) -> None:
            self.started_at, self.finished_at = now, now.replace(second=seconds)

    assert progress.eta([_Row(10), _Row(30)], 5, since_last=5.0) == "0:00:55"
    assert progress.eta([_Row(10)], 1, since_last=0.0) == "0:00:00"
    assert progress.eta([_Row(10)], 2, since_last=99.0) == "0:00:00"  # never negative


# --- a run stopped at its central DP budget ---------------------------------------------------


def test_a_run_stopped_at_its_central_budget_exits_4_with_the_reason_and_its_epsilon(tmp_path, capsys):
    engine = open_database(f"sqlite:///{tmp_path}/r.db")
    recorder = RunRecorder(engine)
    run_id = recorder.start_run(config={}, aggregator="fedavg", model="tiny", tag="t", flwr_run_id=1)
    now = datetime(2026, 1, 1)
    for number, spent in ((1, 0.9), (2, 1.4)):
        recorder.record_round(run_id, RoundReport(number=number, started_at=now, finished_at=now, outcomes=(OK,),
                                                  aggregated=True, train_loss=1.0, relative_error=0.0,
                                                  aggregate_seconds=0.0), None, central_epsilon=spent)
    reason = "central DP budget exhausted: round 3 would bring user-level ε to 1.8 > dp-central-epsilon 1.5 [x]"
    recorder.finish_run(run_id, status="stopped", error=reason)
    code = _summarize(engine, run_id, tmp_path)
    out = capsys.readouterr().out.replace("\n", " ")
    assert code == progress.EXIT_STOPPED == 4
    assert reason in out and "done" not in out
    assert f"its model after round 2: fedlora export {run_id} --out DIR" in out
    assert "central DP: user-level ε 1.4 at δ = 1e-05 after 2 rounds" in out


def test_the_plan_says_how_many_rounds_the_central_budget_affords_before_the_run_starts():
    from privacy.accounting import epsilon

    def plan(**kwargs):
        cfg = RunConfig(model="tiny", aggregator="fedavg", num_server_rounds=10, clients_per_round=2,
                        dp_central_clip=1.0, dp_central_noise=1.0, dp_accountant="rdp", **kwargs)
        return progress.central_plan(cfg, nodes=4)

    assert progress.central_plan(RunConfig(model="tiny"), nodes=4) is None
    spent = epsilon(((1.0, 0.5, 10),), delta=1e-5, accountant="rdp")
    assert plan() == f"central DP: user-level ε {spent:.4g} after 10 rounds (δ = 1e-05, q = 0.5, z = 1, rdp)"
    budget = (epsilon(((1.0, 0.5, 4),), delta=1e-5, accountant="rdp")
              + epsilon(((1.0, 0.5, 5),), delta=1e-5, accountant="rdp")) / 2
    assert plan(dp_central_epsilon=budget).endswith("affords 4 of 10 rounds (δ = 1e-05, q = 0.5, z = 1, rdp); "
                                                    "the run stops before round 5")


def test_fedlora_run_with_its_database_follows_the_record_while_the_log_goes_to_a_file(tmp_path, capsys):
    import sys

    _recorded_run(tmp_path, (OK,))
    log_path = tmp_path / "logs" / "run-77.log"
    stream = [sys.executable, "-c", "print('INFO : [ROUND 1/1]')"]  # what `flwr log --stream` would write
    progress.watch(f"sqlite:///{tmp_path}/r.db", "t", stream, env={}, rounds=1, log_path=log_path)
    out = capsys.readouterr().out
    assert out.splitlines()[0] == progress.HEADER and out.splitlines()[1].split()[:2] == ["1", "1/1"]
    assert "[ROUND 1/1]" in log_path.read_text() and "[ROUND" not in out
    assert f"Flower log: {log_path}" in out


def test_plain_lines_say_which_round_is_running_after_30_quiet_seconds(capsys):
    from cli.console import console

    display = progress.PlainDisplay(console, 3)
    display.tick()  # the run has no row yet: nothing to say
    display.show([object()], ["      0 (round 0's evaluation)", "      1 row"])  # 1 round, 2 rows
    display.tick()  # just recorded: quiet
    display.last_change -= 31
    display.tick()
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "  ... round 2/3 running" and sum("running" in line for line in out) == 1


def test_an_evaluated_round_gets_one_federated_line_then_one_per_node_that_failed(tmp_path):
    from tests.server.test_federated_report import federated_run

    engine = open_database(f"sqlite:///{tmp_path}/r.db")
    run_id = federated_run(f"sqlite:///{tmp_path}/r.db")
    with Session(engine) as session:
        first, second = progress.round_rows(session, run_id)
    lines = first.splitlines()
    assert lines[0].split()[:3] == ["1", "1/1", "2.0000"]  # the round's own row, as before
    assert lines[1] == (" " * 9 + "federated loss 2.1186 over 3/3 nodes: worst 5.0000 median 2.2000 best 2.0000 "
                        "(worst: clinic-c, 8 ex)")
    assert len(lines) == 2
    lines = second.splitlines()
    assert lines[1].startswith(" " * 9 + "federated loss 1.5857 over 2/3 nodes: worst 1.7000")
    assert lines[2] == " " * 9 + "node clinic-c (evaluation): failed: evaluation failed: CUDA out of memory <oom>"

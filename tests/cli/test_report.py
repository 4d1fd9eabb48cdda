"""``fedlora report``'s summary table on an 80-column terminal: every header whole."""

from datetime import timedelta

from rich.console import Console

import cli.report
from cli.app import main
from core.trainer import EvalResult
from server.db.session import open_database
from server.evaluate import TimedEval
from server.recording import RunRecorder
from server.rounds import utcnow
from server.report import SUMMARY_COLUMNS
from server.rounds import ClientOutcome, RoundReport


def _run(db: str, aggregator: str, status: str) -> int:
    rec = RunRecorder(open_database(db))
    run_id = rec.start_run(config={}, aggregator=aggregator, model="tiny", tag="", flwr_run_id=None)
    t0 = utcnow() - timedelta(seconds=12345)  # the recorder stamps the round's end itself
    outcomes = (ClientOutcome(7, "ok", rank=16, num_examples=50, train_loss=2.0, seconds=3.0, bytes_down=250_000_000,
                              bytes_up=250_000_000, metrics={"dp-epsilon": 12.345}),)
    rec.record_round(run_id, RoundReport(number=1, started_at=t0, finished_at=t0 + timedelta(seconds=3),
                                         outcomes=outcomes, aggregated=True, train_loss=2.0, relative_error=0.1,
                                         aggregate_seconds=0.1), TimedEval(EvalResult(9.4, 12345.678, 64, 900), 1.0))
    rec.finish_run(run_id, status=status)
    return run_id


def test_the_summary_shows_every_header_whole_at_80_columns(tmp_path, monkeypatch):
    db = f"sqlite:///{tmp_path}/r.db"
    ids = [_run(db, "fedex-lora", "interrupted"), _run(db, "fedavg", "completed")]
    narrow = Console(width=80, record=True)
    monkeypatch.setattr(cli.report, "console", narrow)
    assert main(["report", *map(str, ids), "--out", str(tmp_path / "out"), "--db", db]) == 0
    lines = narrow.export_text().splitlines()
    header = next(line for line in lines if line.startswith("run "))
    for column in SUMMARY_COLUMNS:
        assert f" {column} " in f" {header} ", column
    assert max(map(len, lines)) <= 80 and not any("…" in line for line in lines)
    row = lines.index(next(line for line in lines if line.startswith("1 ")))
    # numbers are never cut (four significant figures above 1000 keep them narrow) ...
    assert lines[row].split()[:2] == ["1", "fedex-lora"]
    assert lines[row].split()[3:] == ["1", "12346", "1", "250.00", "250.00", "12345", "12.345"]
    # ... the status folds within its column when the row is this wide, and reads back whole
    start, end = header.index("status"), header.index("rounds")
    assert lines[row][start:end].strip() + lines[row + 1][start:end].strip() == "interrupted"


def test_each_runs_federated_rounds_show_the_aggregate_and_the_spread_at_80_columns(tmp_path, monkeypatch):
    from server.federated_report import FEDERATED_COLUMNS
    from tests.server.test_federated_report import federated_run

    db = f"sqlite:///{tmp_path}/r.db"
    ids = [_run(db, "fedavg", "completed"), federated_run(db), federated_run(db, per_node=False)]
    narrow = Console(width=80, record=True)
    monkeypatch.setattr(cli.report, "console", narrow)
    assert main(["report", *map(str, ids), "--out", str(tmp_path / "out"), "--db", db]) == 0
    text = narrow.export_text()
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in text
    assert f"run {ids[0]} (fedavg): federated evaluation" not in text  # no federated evaluation: no table
    headers = [i for i, line in enumerate(lines) if line.split()[:2] == ["round", "nodes"]]
    assert len(headers) == 2
    for i in headers:
        for column in FEDERATED_COLUMNS:
            assert f" {column} " in f" {lines[i]} ", column
    per_node, aggregate_only = ([line.split() for line in lines[i + 2:i + 4]] for i in headers)
    assert per_node == [["1", "3/3", "2.1186", "8.32", "5.0000", "2.2000", "2.0000", "clinic-c", "(8)"],
                        ["2", "2/3", "1.5857", "4.88", "1.7000", "1.6000", "1.5000", "hospital-b", "(300)"]]
    assert aggregate_only[0] == ["1", "3/3", "2.1186", "8.32", "5.0000", "2.2000", "2.0000", "-"]

"""``fedlora runs`` on an 80-column terminal: every header whole, long values folded, not cut."""

from datetime import datetime

from rich.console import Console

import cli.runs
from cli.app import main
from core.trainer import EvalResult
from server.db.session import open_database
from server.evaluate import TimedEval
from server.recording import RunRecorder
from server.rounds import RoundReport

LONG_MODEL = "/home/someone/models/SmolLM2-135M-Instruct-finetuned-local-copy"


def _runs(db: str) -> None:
    rec = RunRecorder(open_database(db))
    for aggregator, model, status in (("fedavg", "smollm2", "completed"), ("fedex-lora", LONG_MODEL, "interrupted")):
        run_id = rec.start_run(config={}, aggregator=aggregator, model=model, tag="", flwr_run_id=None)
        now = datetime.now()
        report = RoundReport(number=1, started_at=now, finished_at=now, outcomes=(), aggregated=True,
                             train_loss=2.0, relative_error=None, aggregate_seconds=0.0)
        rec.record_round(run_id, report, TimedEval(EvalResult(9.4, 12345.678, 64, 900), 1.0))
        rec.finish_run(run_id, status=status)


def test_runs_shows_every_header_whole_at_80_columns(tmp_path, monkeypatch):
    db = f"sqlite:///{tmp_path}/runs.db"
    _runs(db)
    narrow = Console(width=80, record=True)
    monkeypatch.setattr(cli.runs, "console", narrow)
    assert main(["runs", "--db", db]) == 0
    text = narrow.export_text()
    lines = text.splitlines()
    header = next(line for line in lines if line.split()[:1] == ["id"])
    for column in cli.runs.RUNS_COLUMNS:
        assert f" {column} " in f" {header} ", column  # whole, on the header line
    assert "…" not in text and max(map(len, lines)) <= 80
    for value in ("fedex-lora", "interrupted", "completed", "12345.68", "smollm2"):
        assert value in text, value
    # the long path folds within its column: read the column's slice of every line back
    start, end = header.index("model"), header.index("status")
    assert LONG_MODEL in "".join(line[start:end].strip() for line in lines[lines.index(header) + 1:])


def test_runs_shows_each_runs_last_federated_round_with_its_spread_at_80_columns(tmp_path, monkeypatch):
    from tests.server.test_federated_report import federated_run

    db = f"sqlite:///{tmp_path}/runs.db"
    _runs(db)  # two runs without federated evaluation: no row of their own below
    run_id = federated_run(db, rounds={2: [("hospital-a", 1.5, 400), ("a-very-long-node-name-for-the-clinic", 6.25, 8)]})
    narrow = Console(width=80, record=True)
    monkeypatch.setattr(cli.runs, "console", narrow)
    assert main(["runs", "--db", db]) == 0
    lines = narrow.export_text().splitlines()
    assert max(map(len, lines)) <= 80 and not any("…" in line for line in lines)
    header = next(line for line in lines if line.split()[:2] == ["id", "round"])
    for column in ("id", *cli.runs.FEDERATED_COLUMNS):
        assert f" {column} " in f" {header} ", column
    body = lines[lines.index(header) + 2:]
    assert body[0].split()[:7] == [str(run_id), "2", "2/2", "1.5931", "4.92", "6.2500", "3.8750"]
    # a run without server-side evaluation shows the federated aggregate in the first table, marked
    first = next(line for line in lines if line.split()[:2] == [str(run_id), "flora"])
    assert "4.92 F" in first
    # the worst node's key folds within its column, its held-out count with it
    start = header.index("worst node")
    assert "".join(line[start:].strip() for line in body[:2]) == "a-very-long-node-name-for-the-clinic (8)"

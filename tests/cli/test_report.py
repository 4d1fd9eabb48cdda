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

from datetime import datetime, timedelta

from core.trainer import EvalResult
from cli.app import main
from server.db.session import open_database
from server.evaluate import TimedEval
from server.recording import RunRecorder
from server.rounds import ClientOutcome, RoundReport


def _small_run(db: str, *, rounds: int, finish: bool, dp: bool = False) -> int:
    rec = RunRecorder(open_database(db))
    run_id = rec.start_run(config={}, aggregator="fedavg", model="tiny", tag="", flwr_run_id=None)
    rec.record_evaluation(run_id, 0, TimedEval(EvalResult(5.0, 148.4, 100, 8), 0.1))
    t0 = datetime(2026, 1, 1)
    for r in range(1, rounds + 1):
        metrics = {"dp-epsilon": 0.5 * r} if dp else {}
        outcomes = tuple(ClientOutcome(n, "ok", rank=4, num_examples=10, train_loss=3.0 / r, seconds=1.0,
                                       bytes_down=2000, bytes_up=1000, metrics=metrics) for n in (11, 12))
        report = RoundReport(number=r, started_at=t0 + timedelta(seconds=10 * r), finished_at=t0,
                             outcomes=outcomes, aggregated=True, train_loss=3.0 / r, relative_error=0.1,
                             aggregate_seconds=0.01)
        rec.record_round(run_id, report, TimedEval(EvalResult(4.0 / r, 50.0 / r, 100, 8), 0.1))
    if finish:
        rec.finish_run(run_id, status="completed")
    return run_id


def test_report_writes_plots_and_html_with_every_round(tmp_path, capsys):
    db = f"sqlite:///{tmp_path}/r.db"
    a = _small_run(db, rounds=3, finish=True, dp=True)
    b = _small_run(db, rounds=2, finish=False)  # still running: report what is there
    out = tmp_path / "report"
    assert main(["report", str(a), str(b), "--out", str(out), "--db", db]) == 0
    for name in ("train_loss", "eval_perplexity", "bytes", "clients", "epsilon"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5
    assert f"run {a} (fedavg)" in page and "running" in page
    for r in (1, 2, 3):
        assert f"<tr><td>{r}</td><td>2/2</td>" in page
    text = capsys.readouterr().out
    assert "1.500" in text  # max epsilon of run a (0.5 * 3)


def test_report_of_missing_run_names_it(tmp_path, capsys):
    db = f"sqlite:///{tmp_path}/e.db"
    open_database(db)
    assert main(["report", "9", "--out", str(tmp_path / "x"), "--db", db]) == 2
    assert "run 9" in capsys.readouterr().out


def test_report_refuses_a_database_that_does_not_exist(tmp_path, capsys):
    # a mistyped path used to leave a new directory and an empty database behind
    db = f"sqlite:///{tmp_path}/typo/r.db"
    assert main(["report", "1", "--out", str(tmp_path / "x"), "--db", db]) == 2
    out = capsys.readouterr().out.replace("\n", "")
    assert "does not exist" in out and f"{tmp_path}/typo/r.db" in out
    assert not (tmp_path / "typo").exists() and not (tmp_path / "x").exists()

import shutil
import subprocess
from datetime import datetime, timedelta

import pytest

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


def _mixed_run(db: str) -> int:
    """Two rounds: one client fails, one is rejected with a reason that needs escaping, one declines."""
    rec = RunRecorder(open_database(db))
    config = {"aggregator": "flora", "num-server-rounds": 2, "partition": "dirichlet:0.5", "ranks": "4,8"}
    run_id = rec.start_run(config=config, aggregator="flora", model="tiny", tag="", flwr_run_id=None)
    t0 = datetime(2026, 1, 1)
    rounds = [
        (ClientOutcome(1001, "ok", rank=4, num_examples=37, train_loss=2.5, seconds=1.25, bytes_down=2048,
                       bytes_up=1_500_000, metrics={"dp-epsilon": 0.75}),
         ClientOutcome(1002, "failed", reason="CUDA out of memory", bytes_down=2048)),
        (ClientOutcome(1001, "ok", rank=4, num_examples=37, train_loss=2.0, seconds=1.5, bytes_down=2048,
                       bytes_up=1000, metrics={"dp-epsilon": 1.5}),
         ClientOutcome(1003, "rejected", rank=8, num_examples=12, train_loss=9.0, seconds=2.0, bytes_down=2048,
                       bytes_up=1000, reason="update norm 41.0 > 10 x median <3.9>"),
         ClientOutcome(1004, "declined", reason="privacy budget spent")),
    ]
    for number, outcomes in enumerate(rounds, start=1):
        rec.record_round(run_id, RoundReport(number=number, started_at=t0, finished_at=t0 + timedelta(seconds=5),
                                             outcomes=outcomes, aggregated=True, train_loss=2.0, relative_error=0.1,
                                             aggregate_seconds=0.01), None)
    rec.finish_run(run_id, status="completed")
    return run_id


def test_the_html_report_lists_every_client_of_every_round_and_the_config(tmp_path):
    db = f"sqlite:///{tmp_path}/r.db"
    run_id = _mixed_run(db)
    assert main(["report", str(run_id), "--out", str(tmp_path / "out"), "--db", db]) == 0
    page = (tmp_path / "out" / "report.html").read_text()
    clients = page.split('<table class="clients">')[1].split("</table>")[0]
    assert "<th>ε</th>" in clients and clients.count("<tr class=") == 5
    assert ('<tr class="ok"><td rowspan="2">1</td><td><code>1001</code></td><td>ok</td><td>4</td><td>37</td>'
            "<td>2.5000</td><td>1.2</td><td>2.0 kB</td><td>1.50 MB</td><td>0.750</td>") in clients
    assert '<tr class="failed"><td><code>1002</code></td><td>failed</td><td>-</td>' in clients
    assert "CUDA out of memory" in clients and '<td rowspan="3">2</td>' in clients
    assert "update norm 41.0 &gt; 10 x median &lt;3.9&gt;" in clients  # escaped, not markup
    assert '<tr class="declined"><td><code>1004</code></td>' in clients and "privacy budget spent" in clients
    config = page.split('<table class="config">')[1].split("</table>")[0]
    assert "run config (4 keys)" in page
    assert "<tr><td>partition</td><td>dirichlet:0.5</td></tr>" in config
    assert "<tr><td>ranks</td><td>4,8</td></tr>" in config


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not shutil.which(CHROMIUM), reason="headless Chromium is not installed (apt-get install chromium)")
def test_the_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    db = f"sqlite:///{tmp_path}/r.db"
    run_id = _mixed_run(db)
    assert main(["report", str(run_id), "--out", str(tmp_path / "out"), "--db", db]) == 0
    url = (tmp_path / "out" / "report.html").as_uri()
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    # the DOM as Chromium built it: the client table survived the browser's parser whole
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    assert dom.count('<tr class="') == 5 and 'rowspan="3"' in dom and "CUDA out of memory" in dom
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,2000", url], capture_output=True,
                   timeout=120, check=True)
    image = Image.open(shot).convert("L")
    assert image.size == (1280, 2000)
    low, high = image.getextrema()
    assert high - low > 100  # text and plots drawn, not a blank page


@pytest.mark.parametrize("kind, details, needle", [
    ("server-public", {"calibration-ids": ["a", "b", "c"], "evaluation-ids": ["d"]},
     "init server-public (LoRA-SB): 3 calibration examples, none of them evaluated on; 1.5 s, 2.00 MB down, "
     "3.00 MB up"),
    ("federated", {"nodes": [{"node": "n1", "status": "ok"}, {"node": "n2", "status": "declined"},
                             {"node": "n3", "status": "ok"}]},
     "init federated (LoRA-SB): sketches from 2 nodes; 1.5 s, 2.00 MB down, 3.00 MB up"),
    ("random", {}, "init random (ablation"),
])
def test_the_report_says_which_fed_sb_init_a_run_used(tmp_path, capsys, kind, details, needle):
    db = f"sqlite:///{tmp_path}/r.db"
    run_id = _small_run(db, rounds=1, finish=True)
    RunRecorder(open_database(db)).record_init(run_id, kind=kind, seconds=1.5, bytes_down=2_000_000,
                                               bytes_up=3_000_000, details=details)
    plain = _small_run(db, rounds=1, finish=True)  # a method without an init: no line
    out = tmp_path / "report"
    assert main(["report", str(run_id), str(plain), "--out", str(out), "--db", db]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"run {run_id} (fedavg): {needle}" in text
    assert f"run {plain} (fedavg): init" not in text
    assert needle.split(";")[0] in (out / "report.html").read_text()

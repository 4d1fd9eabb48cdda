"""Bad input fails before any training starts, naming the bad value."""

import time

import pytest

from cli.app import main


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--aggregator", "fedsgd"], "'fedsgd'"),
        (["--ranks", "4,0"], "rank 0"),
        (["--ranks", "4,128", "--max-rank", "64"], "rank 128"),
        (["--data", "/nonexistent/train.jsonl"], "/nonexistent/train.jsonl"),
        (["--db", "postgresql+psycopg2://u:pw@127.0.0.1:1/x"], "127.0.0.1:1/x"),
        (["--model", "./no-such-model-dir"], "no-such-model-dir"),
        (["--partition", "file"], "files"),
    ],
)
def test_bad_input_fails_fast_with_the_value(tmp_path, capsys, args, needle):
    start = time.monotonic()
    code = main(["simulate", "--model", "tiny", "--db", f"sqlite:///{tmp_path}/x.db", "--home", str(tmp_path / "h"), *args])
    out = capsys.readouterr().out
    assert code == 2
    assert needle in out.replace("\n", "")
    assert time.monotonic() - start < 60
    assert not (tmp_path / "h").exists()  # no SuperLink was ever started


def test_aggregator_that_cannot_fit_the_model_fails_before_flower_starts(tmp_path, capsys):
    # Fed-SB needs max-rank <= the smallest adapted dimension (the tiny model's is 32)
    code = main(["simulate", "--model", "tiny", "--aggregator", "fed-sb", "--max-rank", "64",
                 "--db", f"sqlite:///{tmp_path}/x.db", "--home", str(tmp_path / "h")])
    assert code == 2 and "max_rank is 64" in capsys.readouterr().out.replace("\n", "")
    assert not (tmp_path / "h").exists()


def _never_started(monkeypatch) -> list:
    """Replace the SuperLink launch with a recorder: a check that runs too late shows up as a call."""
    from cli import simulate

    calls: list = []
    monkeypatch.setitem(simulate.ENGINES, "flower", lambda *a, **k: calls.append(a) or 0)
    return calls


def test_a_read_only_database_fails_before_a_superlink_starts(tmp_path, capsys, monkeypatch):
    from server.db.session import open_database

    path = tmp_path / "ro.db"
    open_database(f"sqlite:///{path}")
    started = _never_started(monkeypatch)
    read_only = f"sqlite:///file:{path}?mode=ro&uri=true"  # chmod 444 does not stop root; this does
    code = main(["simulate", "--model", "tiny", "--db", read_only, "--home", str(tmp_path / "h")])
    out = capsys.readouterr().out
    assert code == 2 and not started
    assert str(path) in out.replace("\n", "") and "readonly" in out and "Traceback" not in out


def test_a_jsonl_line_that_is_not_an_object_fails_fast_naming_file_and_line(tmp_path, capsys, monkeypatch):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n[1, 2, 3]\n')
    started = _never_started(monkeypatch)
    code = main(["simulate", "--model", "tiny", "--data", str(data), "--db", f"sqlite:///{tmp_path}/x.db",
                 "--home", str(tmp_path / "h")])
    assert code == 2 and not started
    assert f"{data}:2: expected a JSON object" in capsys.readouterr().out.replace("\n", "")


def test_runs_refuses_a_database_that_does_not_exist(tmp_path, capsys):
    # a mistyped path used to leave a new directory and an empty database behind
    assert main(["runs", "--db", f"sqlite:///{tmp_path}/typo/fedlora.db"]) == 2
    out = capsys.readouterr().out.replace("\n", "")
    assert "does not exist" in out and f"{tmp_path}/typo/fedlora.db" in out
    assert not (tmp_path / "typo").exists()


def test_simulate_prints_the_directory_its_checkpoints_are_in(tmp_path, capsys):
    from datetime import datetime

    import numpy as np
    from sqlalchemy.orm import Session

    from server import checkpoint as ckpt
    from cli import progress as cli
    from core.config import RunConfig
    from server.db.models import Run
    from server.db.session import open_database
    from server.recording import RunRecorder, SavedCheckpoint
    from server.rounds import RoundReport

    db, root = f"sqlite:///{tmp_path}/r.db", tmp_path / "ckpt"
    engine = open_database(db)
    recorder = RunRecorder(engine)
    run_id = recorder.start_run(config={}, aggregator="fedavg", model="tiny", tag="t", flwr_run_id=1)
    c = ckpt.Checkpoint(round=1, aggregator="fedavg", state=None, merge_log=[],
                        rng_state=np.random.default_rng(0).bit_generator.state, config={})
    path, sha = ckpt.save(c, recorder.checkpoint_directory(run_id, root))
    now = datetime(2026, 1, 1)
    recorder.record_round(run_id, RoundReport(number=1, started_at=now, finished_at=now, outcomes=(), aggregated=True,
                                              train_loss=None, relative_error=None, aggregate_seconds=0.0),
                          None, SavedCheckpoint(path, sha, c.config_hash))
    recorder.finish_run(run_id, status="completed")
    with Session(engine) as s:
        run = s.get(Run, run_id)
        s.expunge(run)
    cfg = RunConfig(model="tiny", db_url=db, checkpoint_dir=str(root))
    cli.summarize(engine, cfg, run, elapsed=1.0, log_path=tmp_path / "flower.log")
    assert f"checkpoints: {path.parent}\n" in capsys.readouterr().out


def test_an_unusable_mlflow_store_fails_before_a_superlink_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    started = _never_started(monkeypatch)
    code = main(["simulate", "--model", "tiny", "--db", f"sqlite:///{tmp_path}/x.db", "--home", str(tmp_path / "h"),
                 "--mlflow-uri", f"file:{tmp_path}/mlruns"])
    out = capsys.readouterr().out.replace("\n", "")
    assert code == 2 and not started
    assert f"mlflow-uri 'file:{tmp_path}/mlruns' cannot be used" in out


def test_a_relative_mlflow_store_is_made_absolute_for_the_serverapp(tmp_path, monkeypatch):
    from cli.app import build_parser
    from cli.simulate import config_from_args

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["simulate", "--model", "tiny", "--mlflow-uri", "sqlite:///mlflow.db"])
    assert config_from_args(args).mlflow_uri == f"sqlite:///{tmp_path}/mlflow.db"


def test_the_demo_trains_every_node_each_round_at_the_methods_rate(tmp_path):
    # `make demo` is `fedlora simulate` with no arguments: what it runs is these defaults
    import aggregation
    from cli.app import build_parser
    from cli.simulate import config_from_args

    cfg = config_from_args(build_parser().parse_args(["simulate", "--db", f"sqlite:///{tmp_path}/d.db"]))
    assert cfg.clients_per_round == 8 and cfg.simulation_nodes == 8
    assert cfg.learning_rate == aggregation.recommended("fedavg").learning_rate
    given = config_from_args(build_parser().parse_args(["simulate", "--clients-per-round", "2", "--lr", "0.01",
                                                        "--db", f"sqlite:///{tmp_path}/d.db"]))
    assert (given.clients_per_round, given.learning_rate) == (2, 0.01)


def demo_args() -> list[str]:
    """What `make demo` adds to `fedlora simulate` (the Makefile's DEMO_ARGS)."""
    import re
    import shlex
    from pathlib import Path

    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    return shlex.split(re.search(r"^DEMO_ARGS :?= ?(.*)$", makefile, re.M).group(1))


@pytest.mark.integration
def test_the_demo_config_runs_end_to_end_on_the_tiny_model(tmp_path):
    # the plumbing only: the tiny model learns nothing (the improvement is a README figure)
    from sqlalchemy.orm import Session

    from server.db.session import open_database
    from server.report import load_series

    db = f"sqlite:///{tmp_path}/demo.db"
    assert main(["simulate", *demo_args(), "--model", "tiny", "--db", db, "--home", str(tmp_path / "flwr"),
                 "--checkpoint-dir", str(tmp_path / "ckpt")]) == 0
    with Session(open_database(db)) as s:
        series = load_series(s, 1)
    assert series.status == "completed" and series.clients_ok == [8, 8, 8]
    assert series.eval_rounds == [0, 1, 2, 3]  # the demo's curve: round 0 and every round
    assert series.config["learning-rate"] == 0.001  # the demo's rate (DEMO_ARGS), recorded as the number used

"""``fedlora simulate --engine inprocess``: the same run, recorded and reported as on Flower's engine."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from cli.app import main
from cli.progress import EXIT_CLIENT_FAILURES
from client import handlers
from server.db.models import ClientUpdateRecord, Evaluation, Run
from server.db.session import open_database

TINY = ["--model", "tiny", "--num-clients", "3", "--rounds", "2", "--local-steps", "1", "--ranks", "2,4,8",
        "--max-rank", "8", "--eval-examples", "4", "--eval-every", "1", "--max-seq-len", "32", "--batch-size", "2",
        "--partition", "iid"]


def _simulate(tmp_path, *extra: str) -> tuple[int, str]:
    db = f"sqlite:///{tmp_path}/runs.db"
    code = main(["simulate", "--engine", "inprocess", *TINY, "--db", db, "--home", str(tmp_path / "flwr"),
                 "--checkpoint-dir", str(tmp_path / "ckpt"), *extra])
    return code, db


def test_a_run_completes_with_every_round_recorded_and_no_superlink(tmp_path, capsys):
    code, db = _simulate(tmp_path)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "in-process" in out and "done in" in out
    with Session(open_database(db)) as s:
        (run,) = s.scalars(select(Run)).all()
        assert run.status == "completed"
        assert sorted(e.round_number for e in s.scalars(select(Evaluation))) == [0, 1, 2]
        assert sorted((u.round_number, u.status) for u in s.scalars(select(ClientUpdateRecord))) == [
            (r, "ok") for r in (1, 2) for _ in range(3)]
    assert not (tmp_path / "flwr" / "superlink").exists()  # Flower's engine never started
    (log,) = (tmp_path / "flwr" / "logs").glob("run-*.log")  # the server's lines went to the run's log
    assert "fedlora: model tiny" in log.read_text()


def test_a_client_that_raises_is_a_failed_row_and_a_nonzero_exit(tmp_path, capsys, monkeypatch):
    real = handlers.HANDLERS["train"]

    def flaky(msg, context):
        if context.node_config["partition-id"] == 1:
            raise RuntimeError("disk on fire")
        return real(msg, context)

    monkeypatch.setitem(handlers.HANDLERS, "train", flaky)
    code, db = _simulate(tmp_path)
    out = capsys.readouterr().out
    assert code == EXIT_CLIENT_FAILURES, out
    assert "failed client" in out and "done in" not in out
    with Session(open_database(db)) as s:
        failed = s.scalars(select(ClientUpdateRecord).where(ClientUpdateRecord.status == "failed")).all()
    assert [u.round_number for u in failed] == [1, 2]
    assert all("disk on fire" in (u.reason or "") for u in failed)


def test_stopping_ends_the_run_at_its_next_message_recorded_as_interrupted(tmp_path):
    # Ctrl-C must end the process: without the stop the app thread went on training (and the
    # interpreter's exit waited for the server's evaluation pool)
    import time

    from cli.inprocess import AppThread
    from core.config import RunConfig

    db = f"sqlite:///{tmp_path}/runs.db"
    cfg = RunConfig(model="tiny", num_server_rounds=50, clients_per_round=2, ranks="2", max_rank=2, local_steps=1,
                    batch_size=2, max_seq_len=32, eval_examples=0, db_url=db, simulation_nodes=2, run_tag="t",
                    checkpoint_dir=str(tmp_path / "ckpt"))
    app = AppThread(cfg.to_flower(), 2, log_path=tmp_path / "run.log").start()
    deadline = time.monotonic() + 120
    while app.grid.delivered == [] or len(app.grid.delivered) < 4:  # round 1 under way
        assert time.monotonic() < deadline and app.poll() is None
        time.sleep(0.1)
    app.stop()
    assert app.poll() == 1 and isinstance(app.error, KeyboardInterrupt)
    with Session(open_database(db)) as s:
        (run,) = s.scalars(select(Run)).all()
    assert run.status == "interrupted"
    assert len(app.grid.delivered) < 2 * 50

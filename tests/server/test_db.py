import time
from datetime import datetime

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.orm import Session

from client.trainer import EvalResult
from server.db.models import ClientUpdateRecord, Evaluation, RoundRecord, Run
from server.db.session import SCHEMA_VERSION, DatabaseError, open_database, scratch_schema, upgrade
from server.evaluate import TimedEval
from server.recording import RunRecorder
from server.rounds import ClientOutcome, RoundReport
from tests.postgres import POSTGRES_URL, unreachable_reason

BIG_NODE = 2**64 - 5  # Flower node ids are unsigned 64-bit


def _report(number: int) -> RoundReport:
    now = datetime(2026, 1, 1)
    return RoundReport(
        number=number, started_at=now, finished_at=now, aggregated=True, train_loss=1.5,
        relative_error=0.1, aggregate_seconds=0.01,
        outcomes=(
            ClientOutcome(BIG_NODE, "ok", rank=8, num_examples=10, train_loss=1.5, seconds=1.0, bytes_down=100, bytes_up=90),
            ClientOutcome(7, "rejected", reason="m.A: contains NaN or Inf", rank=4, bytes_down=50, bytes_up=40),
        ),
    )


def _exercise(engine) -> None:
    rec = RunRecorder(engine)
    run_id = rec.start_run(config={"a": 1}, aggregator="fedavg", model="tiny", tag="t", flwr_run_id=2**63 + 11)
    ev = TimedEval(EvalResult(loss=2.0, perplexity=7.39, tokens=100, examples=4), seconds=0.5)
    rec.record_evaluation(run_id, 0, ev)
    rec.record_round(run_id, _report(1), ev)
    rec.finish_run(run_id, status="completed")
    with Session(engine) as s:
        run = s.get(Run, run_id)
        assert run.status == "completed" and run.flwr_run_id == str(2**63 + 11)
        assert [r.number for r in run.rounds] == [1]
        rows = s.scalars(select(ClientUpdateRecord).where(ClientUpdateRecord.run_id == run_id)).all()
        assert {r.node_id for r in rows} == {str(BIG_NODE), "7"}
        assert {r.status for r in rows} == {"ok", "rejected"}
        assert s.scalar(select(func.count()).select_from(Evaluation).where(Evaluation.run_id == run_id)) == 2


def test_sqlite_write_and_read(tmp_path):
    engine = open_database(f"sqlite:///{tmp_path}/nested/dir/db.sqlite")
    _exercise(engine)


def test_round_is_one_transaction_and_not_recorded_twice(tmp_path):
    engine = open_database(f"sqlite:///{tmp_path}/db.sqlite")
    rec = RunRecorder(engine)
    run_id = rec.start_run(config={}, aggregator="fedavg", model="tiny", tag="", flwr_run_id=None)
    rec.record_round(run_id, _report(1), None)
    with pytest.raises(Exception):
        rec.record_round(run_id, _report(1), None)  # unique (run, number)
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(RoundRecord)) == 1
        # the failed transaction left no orphan client rows behind
        assert s.scalar(select(func.count()).select_from(ClientUpdateRecord)) == 2


def test_upgrade_is_idempotent_on_an_existing_database(tmp_path):
    url = f"sqlite:///{tmp_path}/db.sqlite"
    engine = open_database(url)
    _exercise(engine)
    assert upgrade(create_engine(url)) == SCHEMA_VERSION
    with Session(open_database(url)) as s:
        assert s.scalar(select(func.count()).select_from(Run)) == 1


def test_unreachable_database_fails_fast_and_names_the_url():
    start = time.monotonic()
    with pytest.raises(DatabaseError, match="127.0.0.1:1/nowhere"):
        open_database("postgresql+psycopg2://someone:secret@127.0.0.1:1/nowhere")
    assert time.monotonic() - start < 30


def test_password_is_masked_in_errors():
    with pytest.raises(DatabaseError) as err:
        open_database("postgresql+psycopg2://someone:secret@127.0.0.1:1/nowhere")
    assert "secret" not in str(err.value)


def test_invalid_url_is_named():
    with pytest.raises(DatabaseError, match="not-a-url"):
        open_database("not-a-url")


@pytest.fixture
def postgres_url():
    reason = unreachable_reason()
    if reason:
        pytest.skip(reason)
    with scratch_schema(POSTGRES_URL, prefix="fedlora_test") as url:
        yield url


def test_postgresql_write_and_read(postgres_url):
    _exercise(open_database(postgres_url))


V1_RUNS = """CREATE TABLE runs (id INTEGER PRIMARY KEY, flwr_run_id VARCHAR(20), tag VARCHAR(64),
aggregator VARCHAR(64), model VARCHAR(256), config JSON, status VARCHAR(32), error TEXT,
started_at DATETIME, finished_at DATETIME)"""


def test_a_version_1_database_is_upgraded_in_place_keeping_its_rows(tmp_path):
    url = f"sqlite:///{tmp_path}/old.db"
    engine = create_engine(url)
    with engine.begin() as c:  # what version 1 created, with a run in it
        c.execute(text(V1_RUNS))
        c.execute(text("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at DATETIME)"))
        c.execute(text("INSERT INTO schema_version VALUES (1, '2026-01-01')"))
        c.execute(text("INSERT INTO runs (id, aggregator, model, config, status, started_at) "
                       "VALUES (1, 'fedavg', 'tiny', '{}', 'completed', '2026-01-01')"))
    upgraded = open_database(url)
    with Session(upgraded) as s:
        assert s.get(Run, 1).status == "completed" and s.get(Run, 1).updated_at is None
    with upgraded.connect() as c:
        assert c.execute(text("select max(version) from schema_version")).scalar() == SCHEMA_VERSION
        assert c.execute(text("select count(*) from checkpoints")).scalar() == 0

import time
from datetime import datetime

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.orm import Session

from core.trainer import EvalResult
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


V2_RUNS_EXTRA = "ALTER TABLE runs ADD COLUMN updated_at TIMESTAMP"
V2_CHECKPOINTS = """CREATE TABLE checkpoints (id INTEGER PRIMARY KEY, run_id INTEGER REFERENCES runs(id),
round_number INTEGER, path TEXT, sha256 VARCHAR(64), config_hash VARCHAR(16), created_at DATETIME,
UNIQUE (run_id, round_number))"""


def test_a_version_2_database_gets_run_uuids_in_place_and_old_runs_keep_their_directory(tmp_path):
    url = f"sqlite:///{tmp_path}/v2.db"
    with create_engine(url).begin() as c:  # what version 2 created, with a run in it
        c.execute(text(V1_RUNS))
        c.execute(text(V2_RUNS_EXTRA))
        c.execute(text(V2_CHECKPOINTS))
        c.execute(text("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at DATETIME)"))
        c.execute(text("INSERT INTO schema_version VALUES (1, '2026-01-01'), (2, '2026-01-02')"))
        c.execute(text("INSERT INTO runs (id, aggregator, model, config, status, started_at) "
                       "VALUES (1, 'fedavg', 'tiny', '{}', 'interrupted', '2026-01-01')"))
    recorder = RunRecorder(open_database(url))
    new = recorder.start_run(config={}, aggregator="fedavg", model="tiny", tag="", flwr_run_id=None)
    with Session(open_database(url)) as s:
        old_run, new_run = s.get(Run, 1), s.get(Run, new)
        assert old_run.uuid is None and old_run.status == "interrupted"
        assert len(new_run.uuid) == 32
    assert recorder.checkpoint_directory(1, tmp_path) == tmp_path / "run-1"  # where it already wrote
    assert recorder.checkpoint_directory(new, tmp_path) == tmp_path / f"run-{new}-{new_run.uuid}"
    assert upgrade(create_engine(url)) == SCHEMA_VERSION  # idempotent
    with create_engine(url).begin() as c:  # uuids are unique, as on a new database
        c.execute(text("UPDATE runs SET uuid = 'x' WHERE id = 1"))
        with pytest.raises(Exception, match="UNIQUE"):
            c.execute(text(f"UPDATE runs SET uuid = 'x' WHERE id = {new}"))


def test_readers_refuse_a_sqlite_file_that_does_not_exist(tmp_path):
    # `runs` / `report` / `export` on a typo must not leave a directory and an empty database
    url = f"sqlite:///{tmp_path}/typo/fedlora.db"
    with pytest.raises(DatabaseError, match=f"does not exist.*{tmp_path}/typo/fedlora.db"):
        open_database(url, create=False, write=False)
    assert not (tmp_path / "typo").exists()
    open_database(url)  # the default (simulate, coordinator, ServerApp) still creates one
    open_database(url, create=False, write=False)


def test_a_read_only_database_is_refused_for_writing_and_the_probe_leaves_nothing(tmp_path):
    path = tmp_path / "ro.db"
    open_database(f"sqlite:///{path}")  # an up-to-date schema: opening it writes nothing
    read_only = f"sqlite:///file:{path}?mode=ro&uri=true"  # chmod would not stop root
    with pytest.raises(DatabaseError, match=f"cannot write to database.*{path}.*readonly"):
        open_database(read_only)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("file:")]
    open_database(read_only, create=False, write=False)  # reading it is fine
    with create_engine(f"sqlite:///{path}").connect() as c:
        assert c.execute(text("select min(version) from schema_version")).scalar() == 1  # probe rolled back


def test_postgresql_gets_the_run_uuid_column_in_place(postgres_url):
    engine = open_database(postgres_url)
    with engine.begin() as c:  # back to version 2: no uuid column, a run without one
        c.execute(text("ALTER TABLE runs DROP COLUMN uuid"))
        c.execute(text("DELETE FROM schema_version WHERE version >= 3"))
        c.execute(text("INSERT INTO runs (aggregator, model, config, status, started_at) "
                       "VALUES ('fedavg', 'tiny', '{}', 'completed', now())"))
    engine.dispose()
    upgraded = open_database(postgres_url)
    with Session(upgraded) as s:
        (run,) = s.scalars(select(Run)).all()
        assert run.uuid is None
    assert RunRecorder(upgraded).start_run(config={}, aggregator="fedavg", model="tiny", tag="", flwr_run_id=None)
    upgraded.dispose()


def _a_version_3_database(url: str) -> None:
    """The current schema without ``rounds.central_epsilon``, recorded as version 3, with a round in it."""
    engine = open_database(url)
    recorder = RunRecorder(engine)
    run_id = recorder.start_run(config={}, aggregator="fedavg", model="tiny", tag="v3", flwr_run_id=None)
    recorder.record_round(run_id, _report(1), None)
    with engine.begin() as c:
        c.execute(text("ALTER TABLE rounds DROP COLUMN central_epsilon"))
        c.execute(text("DELETE FROM schema_version WHERE version > 3"))
    engine.dispose()


def _check_central_epsilon_upgrade(url: str) -> None:
    from sqlalchemy import inspect

    _a_version_3_database(url)
    assert "central_epsilon" not in {c["name"] for c in inspect(create_engine(url)).get_columns("rounds")}
    engine = open_database(url)  # upgrades in place
    recorder = RunRecorder(engine)
    recorder.record_round(1, _report(2), None, central_epsilon=1.25)
    with Session(engine) as s:
        rows = s.scalars(select(RoundRecord).order_by(RoundRecord.number)).all()
        assert [(r.number, r.central_epsilon) for r in rows] == [(1, None), (2, 1.25)]  # the old row is kept
    assert upgrade(engine) == SCHEMA_VERSION  # idempotent


def test_a_version_3_sqlite_database_gets_the_central_epsilon_column(tmp_path):
    _check_central_epsilon_upgrade(f"sqlite:///{tmp_path}/v3.db")


def test_a_version_3_postgresql_database_gets_the_central_epsilon_column(postgres_url):
    _check_central_epsilon_upgrade(postgres_url)

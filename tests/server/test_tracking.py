"""The MLflow sink, against a real local MLflow store, read back with MlflowClient."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from server.db import read
from server.db.models import Run
from server.db.session import open_database
from server.evaluate import TimedEval
from server.recording import RunRecorder
from server.rounds import ClientOutcome, RoundReport
from server.tracking import EXPERIMENT, UUID_TAG, MlflowSink, TrackingRecorder, absolute_uri, tracked

CONFIG = {"aggregator": "fedavg", "num-server-rounds": 3, "db-url": "postgresql://fed:secret@db/runs", "seed": 0}


class _Result:
    def __init__(self, loss: float) -> None:
        self.loss, self.perplexity, self.examples, self.tokens = loss, 2.718 ** loss, 8, 80


def _evaluation(loss: float) -> TimedEval:
    return TimedEval(result=_Result(loss), seconds=0.5)


def _report(number: int, *, loss: float) -> RoundReport:
    start = datetime(2026, 1, 1) + timedelta(minutes=number)
    outcomes = (ClientOutcome(1, "ok", rank=4, num_examples=3, train_loss=loss, seconds=1.0, bytes_down=100,
                              bytes_up=40, metrics={"dp-epsilon": 0.5 * number}),
                ClientOutcome(2, "failed", reason="timeout", rank=8, bytes_down=200))
    return RoundReport(number=number, started_at=start, finished_at=start + timedelta(seconds=12), outcomes=outcomes,
                       aggregated=True, train_loss=loss, relative_error=0.01 * number, aggregate_seconds=0.1)


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_a_run_and_its_resume_are_one_mlflow_run_with_every_round(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    engine = open_database(f"sqlite:///{tmp_path}/runs.db")
    recorder = tracked(RunRecorder(engine), uri)
    assert isinstance(recorder, TrackingRecorder)
    run_id = recorder.start_run(config=CONFIG, aggregator="fedavg", model="tiny", tag="abc", flwr_run_id=7)
    recorder.record_evaluation(run_id, 0, _evaluation(3.0))
    recorder.record_round(run_id, _report(1, loss=2.5), None, central_epsilon=0.8)
    recorder.record_evaluation(run_id, 1, _evaluation(2.6))
    recorder.finish_run(run_id, status="interrupted", error="stopped by the user")
    assert recorder.run_status(run_id) == "interrupted"  # the database is written as without tracking

    client = MlflowClient(tracking_uri=uri)
    (interrupted,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert interrupted.info.status == "KILLED"

    # a resume is another process: a new sink finds the same MLflow run by the fedlora run's uuid
    resumed = tracked(RunRecorder(engine), uri)
    run, _ = resumed.reopen_run(run_id)
    resumed.record_round(run_id, _report(2, loss=2.0), _evaluation(2.1), central_epsilon=1.1)
    resumed.finish_run(run_id, status="completed")

    (mlrun,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert mlrun.info.run_id == interrupted.info.run_id
    assert mlrun.info.run_name == f"fedlora-{run_id}-abc" and mlrun.info.status == "FINISHED"
    assert mlrun.data.tags[UUID_TAG] == run.uuid and mlrun.data.tags["fedlora.status"] == "completed"
    params = mlrun.data.params
    assert params["aggregator"] == "fedavg" and params["num-server-rounds"] == "3"
    assert "secret" not in params["db-url"] and "db/runs" in params["db-url"]  # the password never leaves
    rid = mlrun.info.run_id
    assert _history(client, rid, "train_loss") == [(1, 2.5), (2, 2.0)]
    assert _history(client, rid, "eval_loss") == [(0, 3.0), (1, 2.6), (2, 2.1)]
    assert [s for s, _ in _history(client, rid, "eval_perplexity")] == [0, 1, 2]
    assert _history(client, rid, "dp_central_epsilon") == [(1, 0.8), (2, 1.1)]
    assert _history(client, rid, "dp_local_epsilon_max") == [(1, 0.5), (2, 1.0)]
    assert _history(client, rid, "bytes_down") == [(1, 300.0), (2, 300.0)]
    assert _history(client, rid, "bytes_up") == [(1, 40.0), (2, 40.0)]
    assert _history(client, rid, "clients_aggregated") == [(1, 1.0), (2, 1.0)]
    assert _history(client, rid, "clients_sampled") == [(1, 2.0), (2, 2.0)]
    assert _history(client, rid, "relative_error") == [(1, 0.01), (2, 0.02)]
    assert _history(client, rid, "round_seconds") == [(1, 12.0), (2, 12.0)]


def test_two_runs_are_two_mlflow_runs_and_a_legacy_run_without_uuid_is_tracked_by_id(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    engine = open_database(f"sqlite:///{tmp_path}/runs.db")
    plain = RunRecorder(engine)
    legacy = plain.start_run(config={}, aggregator="flora", model="tiny", tag="", flwr_run_id=None)
    with engine.begin() as conn:
        conn.execute(update(Run).where(Run.id == legacy).values(uuid=None))  # as the v3 upgrade leaves old runs
    plain.finish_run(legacy, status="interrupted")
    recorder = tracked(RunRecorder(engine), uri)
    new = recorder.start_run(config={}, aggregator="fedavg", model="tiny", tag="", flwr_run_id=None)
    recorder.reopen_run(legacy)  # tracked from its resume on
    recorder.finish_run(legacy, status="completed")
    client = MlflowClient(tracking_uri=uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])}
    assert set(runs) == {f"fedlora-{legacy}", f"fedlora-{new}"}
    assert runs[f"fedlora-{legacy}"].data.tags[UUID_TAG] == f"run-{legacy}"
    assert runs[f"fedlora-{legacy}"].info.status == "FINISHED" and runs[f"fedlora-{new}"].info.status == "RUNNING"


def test_a_write_mlflow_misses_mid_run_is_a_warning_and_the_database_still_has_it(tmp_path, monkeypatch):
    engine = open_database(f"sqlite:///{tmp_path}/runs.db")
    recorder = tracked(RunRecorder(engine), f"sqlite:///{tmp_path}/mlflow.db")
    run_id = recorder.start_run(config={}, aggregator="fedavg", model="tiny", tag="", flwr_run_id=None)
    warnings: list[str] = []
    monkeypatch.setattr("server.tracking.log", lambda level, msg, *args: warnings.append(msg % args))

    def unreachable(*args, **kwargs):
        raise ConnectionError("tracking server down")

    monkeypatch.setattr(recorder.sink, "log", unreachable)
    recorder.record_round(run_id, _report(1, loss=2.5), None)
    with Session(engine) as s:
        assert [r.number for r in read.rounds(s, run_id)] == [1]
    assert len(warnings) == 1 and "did not record round 1" in warnings[0] and "tracking server down" in warnings[0]


def test_an_unusable_store_fails_naming_the_uri_and_records_nothing_as_running(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ValueError, match=f"mlflow-uri 'file:{tmp_path}/mlruns' cannot be used"):
        MlflowSink(uri=f"file:{tmp_path}/mlruns")  # MLflow 3 refuses the file store unless told to allow it
    engine = open_database(f"sqlite:///{tmp_path}/runs.db")
    sink = MlflowSink(uri=f"sqlite:///{tmp_path}/mlflow.db")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(sink, "open", broken)
    recorder = TrackingRecorder(inner=RunRecorder(engine), sink=sink)
    with pytest.raises(OSError, match="disk full"):
        recorder.start_run(config={}, aggregator="fedavg", model="tiny", tag="", flwr_run_id=None)
    assert RunRecorder(engine).run_status(1) == "failed"  # before any client trained, and not left "running"


def test_without_a_uri_the_recorder_is_unchanged_and_mlflow_is_never_imported():
    recorder = RunRecorder(engine=None)
    assert tracked(recorder, "") is recorder
    probe = "import sys, server.app, cli.app; print('mlflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_relative_local_stores_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_uri("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
    assert absolute_uri("file:./mlruns") == f"file://{tmp_path}/mlruns"
    assert absolute_uri("mlruns") == f"{tmp_path}/mlruns"
    assert absolute_uri("http://mlflow:5000") == "http://mlflow:5000"


def test_a_federated_evaluation_logs_its_aggregate_and_spread_and_the_database_keeps_every_node(tmp_path):
    from mlflow.tracking import MlflowClient

    from server.federated_eval import NodeEvaluationResult, RoundEvaluation

    def evaluation(number: int, losses: list[float | None]) -> RoundEvaluation:
        return RoundEvaluation(number=number, nodes=tuple(
            NodeEvaluationResult(i, f"node-{i}", "ok", loss=loss, perplexity=2.718 ** loss, num_examples=10 * (i + 1),
                                 tokens=100, seconds=0.1) if loss is not None
            else NodeEvaluationResult(i, f"node-{i}", "failed", "no evaluation reply before the deadline")
            for i, loss in enumerate(losses)))

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    engine = open_database(f"sqlite:///{tmp_path}/runs.db")
    recorder = tracked(RunRecorder(engine), uri)
    run_id = recorder.start_run(config={}, aggregator="flora", model="tiny", tag="", flwr_run_id=None)
    recorder.record_federated_evaluation(run_id, evaluation(1, [3.0, 1.0, 2.0]), per_node=True)
    recorder.record_federated_evaluation(run_id, evaluation(2, [None, None]), per_node=True)  # nobody: no metrics
    recorder.record_federated_evaluation(run_id, evaluation(3, [2.0, None, 1.0]), per_node=False)
    client = MlflowClient(tracking_uri=uri)
    (mlrun,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    rid = mlrun.info.run_id
    assert _history(client, rid, "federated_eval_loss") == [(1, pytest.approx((30 + 20 + 60) / 60)),
                                                             (3, pytest.approx((20 + 30) / 40))]
    assert _history(client, rid, "federated_eval_worst_loss") == [(1, 3.0), (3, 2.0)]
    assert _history(client, rid, "federated_eval_median_loss") == [(1, 2.0), (3, 1.5)]
    assert _history(client, rid, "federated_eval_best_loss") == [(1, 1.0), (3, 1.0)]
    assert _history(client, rid, "federated_eval_nodes") == [(1, 3.0), (3, 2.0)]
    assert _history(client, rid, "federated_eval_failed") == [(1, 0.0), (3, 1.0)]
    with Session(engine) as s:  # the database is written as without tracking
        assert len(read.node_evaluations(s, run_id)) == 5  # rounds 1 and 2 per node; round 3 aggregate only
        assert [f.round_number for f in read.federated_evaluations(s, run_id)] == [1, 3]

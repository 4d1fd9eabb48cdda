"""Experiment tracking: the round log, mirrored to MLflow (run-config ``mlflow-uri``).

``TrackingRecorder`` wraps a ``RunRecorder`` the way ``RecordingStrategy`` wraps the
strategy: every write goes to the database first, exactly as without it, and is then
mirrored to one MLflow run per fedlora run: the run config as params, and per round
train loss, held-out loss and perplexity, bytes up and down, ε, the aggregation's
relative error and the clients sampled and aggregated, and with federated evaluation the
round's aggregate and its spread across nodes (step = round number). It never
sees the math, only what the recorder is asked to write.

The MLflow run is named after the fedlora run (``fedlora-<id>[-<tag>]``) and found again
by the run's uuid tag, so a resumed run (``resume-run-id``, ``fedlora resume``)
continues the same MLflow run, also from another process. Opening the store and the
run happens before any client trains and fails the run, naming the URI; a write that
fails later is logged as a warning: the database is the record, MLflow a copy of it.

MLflow is imported only when ``mlflow-uri`` is set (it takes seconds). A local store:
``sqlite:///ABSOLUTE/PATH/mlflow.db`` (MLflow 3 refuses a plain directory, ``file:``,
unless ``MLFLOW_ALLOW_FILE_STORE=true``); a server: ``http://host:5000``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from logging import WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from flwr.common import log
from sqlalchemy.orm import Session

from server.db.models import CheckpointRecord, Run
from server.db.session import masked
from server.federated_eval import RoundEvaluation
from server.recording import PrunedCheckpoint, RunRecorder
from server.rounds import RoundReport

if TYPE_CHECKING:  # server.evaluate holds the model (torch, PEFT)
    from server.evaluate import TimedEval

EXPERIMENT = "fedlora"
UUID_TAG = "fedlora.run_uuid"
#: fedlora run status -> MLflow run status (a budget stop ended the run as configured)
MLFLOW_STATUS = {"completed": "FINISHED", "stopped": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
PARAMS_PER_BATCH = 100  # MLflow's log_batch limit


def tracked(recorder: RunRecorder, uri: str) -> RunRecorder | TrackingRecorder:
    """``recorder`` itself without a URI (MLflow is never imported), else wrapped."""
    return TrackingRecorder(inner=recorder, sink=MlflowSink(uri=uri)) if uri else recorder


def absolute_uri(uri: str) -> str:
    """A local store given relative to here, made absolute: the ServerApp runs in another directory."""
    parsed = urlparse(uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    if parsed.scheme == "file" and not parsed.netloc and not parsed.path.startswith("/"):
        return Path(parsed.path).resolve().as_uri()
    if uri and not parsed.scheme:  # a bare directory: MLflow's file store
        return str(Path(uri).expanduser().resolve())
    return uri


def round_metrics(report: RoundReport, central_epsilon: float | None) -> dict[str, float]:
    """What one recorded round gives MLflow; values that are absent or not finite are left out."""
    local = [float(o.metrics["dp-epsilon"]) for o in report.outcomes if "dp-epsilon" in (o.metrics or {})]
    values: dict[str, float | None] = {
        "train_loss": report.train_loss,
        "relative_error": report.relative_error,
        "bytes_up": float(report.bytes_up),
        "bytes_down": float(report.bytes_down),
        "clients_sampled": float(len(report.outcomes)),
        "clients_aggregated": float(report.num_ok if report.aggregated else 0),
        "round_seconds": (report.finished_at - report.started_at).total_seconds(),
        "dp_central_epsilon": central_epsilon,  # user-level, the run's
        "dp_local_epsilon_max": max(local) if local else None,  # example-level, the worst node's
    }
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}


def evaluation_metrics(evaluation: TimedEval) -> dict[str, float]:
    values = {"eval_loss": evaluation.result.loss, "eval_perplexity": evaluation.result.perplexity}
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}


def federated_metrics(evaluation: RoundEvaluation) -> dict[str, float]:
    """A round's federated evaluation: the aggregate and the spread across nodes (empty if none evaluated)."""
    spread = evaluation.spread()
    if not spread:
        return {}
    values = {"federated_eval_loss": evaluation.loss, "federated_eval_perplexity": evaluation.perplexity,
              "federated_eval_worst_loss": spread["worst"], "federated_eval_median_loss": spread["median"],
              "federated_eval_best_loss": spread["best"], "federated_eval_nodes": len(evaluation.ok),
              "federated_eval_failed": len(evaluation.nodes) - len(evaluation.ok)}
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}


class MlflowSink:
    """One MLflow run per fedlora run, known by the fedlora run's key (its uuid)."""

    def __init__(self, *, uri: str, experiment: str = EXPERIMENT) -> None:
        from mlflow.tracking import MlflowClient  # lazy: only runs that track pay for the import

        self.uri = uri
        try:
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        except Exception as exc:  # MlflowException, OSError, SQLAlchemy's: all mean this store is unusable
            raise ValueError(f"mlflow-uri {masked(uri)!r} cannot be used: {_first_line(exc)}") from None
        self._ids: dict[str, str] = {}
        self._lock = threading.Lock()  # evaluations are recorded from their own thread

    def find(self, key: str) -> str | None:
        if key not in self._ids:
            runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{UUID_TAG}` = '{key}'",
                                           max_results=1)
            if not runs:
                return None
            self._ids[key] = runs[0].info.run_id
        return self._ids[key]

    def open(self, key: str, *, name: str, tags: Mapping[str, str], params: Mapping[str, Any]) -> str:
        """Continue the MLflow run of ``key`` if there is one, else start it with ``params``."""
        from mlflow.entities import Param

        with self._lock:
            existing = self.find(key)
            if existing is not None:  # a resumed run: its params are logged already (and may not change)
                self.client.update_run(existing, status="RUNNING")
                return existing
            run = self.client.create_run(self.experiment_id, run_name=name, tags={**tags, UUID_TAG: key})
            items = [Param(k, str(v)) for k, v in params.items()]
            for start in range(0, len(items), PARAMS_PER_BATCH):
                self.client.log_batch(run.info.run_id, params=items[start:start + PARAMS_PER_BATCH])
            self._ids[key] = run.info.run_id
            return run.info.run_id

    def log(self, key: str, metrics: Mapping[str, float], *, step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        with self._lock:
            run_id = self._require(key)
            self.client.log_batch(run_id, metrics=[Metric(k, v, stamp, step) for k, v in metrics.items()])

    def close(self, key: str, *, status: str, error: str | None) -> None:
        with self._lock:
            run_id = self._require(key)
            self.client.set_tag(run_id, "fedlora.status", status)
            if error:
                self.client.set_tag(run_id, "fedlora.error", error[:5000])  # MLflow caps tag values
            self.client.set_terminated(run_id, status=MLFLOW_STATUS.get(status, "FAILED"))

    def _require(self, key: str) -> str:
        run_id = self.find(key)
        if run_id is None:
            raise LookupError(f"no MLflow run tagged {UUID_TAG}={key} in {masked(self.uri)}")
        return run_id


class TrackingRecorder:
    """A ``RunRecorder`` that mirrors each write to an ``MlflowSink`` (see the module docstring)."""

    def __init__(self, *, inner: RunRecorder, sink: MlflowSink) -> None:
        self.inner = inner
        self.sink = sink

    def __getattr__(self, name: str) -> Any:  # reads and the rest of the recorder: unchanged
        return getattr(self.inner, name)

    def start_run(self, **kwargs: Any) -> int:
        run_id = self.inner.start_run(**kwargs)
        try:
            self._open(run_id)
        except BaseException as exc:  # before any client trains: the run is recorded as failed, not "running"
            self.inner.finish_run(run_id, status="failed", error=f"MLflow: {type(exc).__name__}: {exc}")
            raise
        return run_id

    def reopen_run(self, run_id: int) -> tuple[Run, CheckpointRecord | None]:
        run, latest = self.inner.reopen_run(run_id)
        try:
            self._open(run_id)
        except BaseException as exc:
            self.inner.finish_run(run_id, status="failed", error=f"MLflow: {type(exc).__name__}: {exc}")
            raise
        return run, latest

    def record_round(self, run_id: int, report: RoundReport, evaluation: TimedEval | None, *args: Any,
                     **kwargs: Any) -> list[PrunedCheckpoint]:
        # the recorder's own options (checkpoint, keep, ...) pass through as given: only what is mirrored is read
        stale = self.inner.record_round(run_id, report, evaluation, *args, **kwargs)
        metrics = round_metrics(report, kwargs.get("central_epsilon"))
        if evaluation is not None:
            metrics.update(evaluation_metrics(evaluation))
        self._mirror(run_id, f"round {report.number}", lambda key: self.sink.log(key, metrics, step=report.number))
        return stale

    def record_evaluation(self, run_id: int, round_number: int, evaluation: TimedEval) -> None:
        self.inner.record_evaluation(run_id, round_number, evaluation)
        self._mirror(run_id, f"evaluation {round_number}",
                     lambda key: self.sink.log(key, evaluation_metrics(evaluation), step=round_number))

    def record_federated_evaluation(self, run_id: int, evaluation: RoundEvaluation, *, per_node: bool) -> None:
        # MLflow gets the aggregate and the spread either way; per-node rows stay in the database
        self.inner.record_federated_evaluation(run_id, evaluation, per_node=per_node)
        metrics = federated_metrics(evaluation)
        if metrics:
            self._mirror(run_id, f"federated evaluation {evaluation.number}",
                         lambda key: self.sink.log(key, metrics, step=evaluation.number))

    def finish_run(self, run_id: int, *, status: str, error: str | None = None) -> None:
        self.inner.finish_run(run_id, status=status, error=error)
        self._mirror(run_id, f"status {status}", lambda key: self.sink.close(key, status=status, error=error))

    def _open(self, run_id: int) -> None:
        with Session(self.inner.engine) as session:
            run = session.get(Run, run_id)
            config = dict(run.config or {})
            name = f"fedlora-{run_id}" + (f"-{run.tag}" if run.tag else "")
            tags = {"fedlora.run_id": str(run_id), "fedlora.tag": run.tag or "", "fedlora.aggregator": run.aggregator,
                    "fedlora.model": run.model, "fedlora.database": masked(str(self.inner.engine.url))}
            key = self._key(run)
        if config.get("db-url"):
            config["db-url"] = masked(str(config["db-url"]))  # never a password in the tracking store
        self.sink.open(key, name=name, tags=tags, params=config)

    def _mirror(self, run_id: int, what: str, write: Callable[[str], None]) -> None:
        try:
            with Session(self.inner.engine) as session:
                key = self._key(session.get(Run, run_id))
            write(key)
        except Exception as exc:  # the database has it; the copy in MLflow misses this write
            log(WARNING, "fedlora: MLflow (%s) did not record %s of run %d: %s: %s",
                masked(self.sink.uri), what, run_id, type(exc).__name__, _first_line(exc))

    @staticmethod
    def _key(run: Run) -> str:
        # uuids are unique beyond one database; runs recorded before they existed fall back to the id
        return run.uuid or f"run-{run.id}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

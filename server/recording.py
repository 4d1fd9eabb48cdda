"""Recording: the one place that writes to the database.

``RunRecorder`` owns the writes (a run row, one transaction per round, the final
status). ``RecordingStrategy`` wraps any ``LoraStrategy``, the way Flower's DP wrappers
wrap a strategy: it delegates the four message hooks and, at the end of each round,
writes that round's row and one row per sampled client in a single transaction before
the next round starts. The server-side evaluation of a round (``eval_schedule``) runs
beside the next round's training and is written when it finishes.
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from sqlalchemy import Engine, delete, select, update
from sqlalchemy.orm import Session

from privacy.accounting import CentralAccount, sample_rate
from server import checkpoint as ckpt
from server.db.models import (
    CheckpointRecord,
    ClientUpdateRecord,
    Evaluation,
    FederatedEvaluation,
    NodeEvaluation,
    InitRecord,
    RoundRecord,
    Run,
)
from server.eval_schedule import Evaluate, EvaluationSchedule, due
from server.federated_eval import RoundEvaluation
from server.rounds import RoundReport, utcnow
from server.strategy import LoraStrategy

if TYPE_CHECKING:  # server.evaluate holds the model (torch, PEFT); the CLI reads the log without it
    from server.evaluate import TimedEval


@dataclass(frozen=True)
class SavedCheckpoint:
    path: Path
    sha256: str
    config_hash: str


@dataclass(frozen=True)
class PrunedCheckpoint:
    """A checkpoint whose row is gone: its file may go once the commit is done."""

    path: Path
    sha256: str  # what the run wrote; ``checkpoint.discard`` keeps a file that differs


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def latest_checkpoint_row(session: Session, run_id: int) -> CheckpointRecord | None:
    """The run's checkpoint of its highest round, the one a resume or an export starts from."""
    return session.scalars(select(CheckpointRecord).where(CheckpointRecord.run_id == run_id)
                           .order_by(CheckpointRecord.round_number.desc())).first()


class RunRecorder:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def start_run(self, *, config: dict[str, Any], aggregator: str, model: str, tag: str, flwr_run_id: int | None) -> int:
        with Session(self.engine) as session, session.begin():
            run = Run(
                uuid=uuid.uuid4().hex,
                flwr_run_id=None if flwr_run_id is None else str(flwr_run_id),
                tag=tag or None,
                aggregator=aggregator,
                model=model,
                config=config,
                status="running",
                started_at=utcnow(),
                updated_at=utcnow(),
            )
            session.add(run)
            session.flush()
            return run.id

    def checkpoint_directory(self, run_id: int, root: Path) -> Path:
        """The directory under ``root`` that this run's checkpoints are written to."""
        with Session(self.engine) as session:
            run_uuid = session.scalar(select(Run.uuid).where(Run.id == run_id))
        return ckpt.run_directory(root, run_id=run_id, run_uuid=run_uuid)

    def record_round(
        self, run_id: int, report: RoundReport, evaluation: TimedEval | None,
        checkpoint: SavedCheckpoint | None = None, keep: int = 0, *, central_epsilon: float | None = None,
        eval_wait_seconds: float = 0.0,
    ) -> list[PrunedCheckpoint]:
        """One transaction: the round, its client rows, evaluation and checkpoint reference.

        ``central_epsilon``: the user-level ε central DP has spent through this round.

        Returns checkpoints that fell out of the last ``keep`` and may be deleted (only
        after this commit, so the database never points at a missing file). A file
        that any remaining row of this database still references is not returned.
        """
        with Session(self.engine) as session, session.begin():
            row = RoundRecord(
                run_id=run_id,
                number=report.number,
                started_at=report.started_at,
                finished_at=utcnow(),
                num_sampled=len(report.outcomes),
                num_aggregated=report.num_ok if report.aggregated else 0,
                train_loss=_finite(report.train_loss),
                relative_error=_finite(report.relative_error),
                central_epsilon=_finite(central_epsilon),
                bytes_down=report.bytes_down,
                bytes_up=report.bytes_up,
                aggregate_seconds=report.aggregate_seconds,
                metrics={"aggregated": report.aggregated, "eval-wait-seconds": eval_wait_seconds},
            )
            session.add(row)
            session.flush()
            for o in report.outcomes:
                session.add(
                    ClientUpdateRecord(
                        run_id=run_id, round_id=row.id, round_number=report.number,
                        node_id=str(o.node_id), rank=o.rank, num_examples=o.num_examples,
                        train_loss=_finite(o.train_loss), seconds=o.seconds,
                        bytes_down=o.bytes_down, bytes_up=o.bytes_up,
                        status=o.status, reason=o.reason, metrics=o.metrics,
                    )
                )
            if evaluation is not None:
                session.add(self._evaluation(run_id, report.number, evaluation))
            session.execute(update(Run).where(Run.id == run_id).values(updated_at=utcnow()))
            stale: list[PrunedCheckpoint] = []
            if checkpoint is not None:
                session.add(CheckpointRecord(
                    run_id=run_id, round_number=report.number, path=str(checkpoint.path),
                    sha256=checkpoint.sha256, config_hash=checkpoint.config_hash, created_at=utcnow(),
                ))
                session.flush()
                rows = session.scalars(select(CheckpointRecord).where(CheckpointRecord.run_id == run_id)
                                       .order_by(CheckpointRecord.round_number.desc())).all()
                for old in rows[keep:] if keep else []:
                    stale.append(PrunedCheckpoint(path=Path(old.path), sha256=old.sha256))
                    session.delete(old)
                if stale:  # a file that another row of this database points at stays
                    referenced = set(session.scalars(select(CheckpointRecord.path).where(
                        CheckpointRecord.path.in_([str(p.path) for p in stale]))))
                    stale = [p for p in stale if str(p.path) not in referenced]
        return stale

    def record_init(self, run_id: int, *, kind: str, seconds: float, bytes_down: int, bytes_up: int,
                    details: dict[str, Any]) -> None:
        """The run's adapter initialisation (Fed-SB's LoRA-SB init, ``server.lora_sb_round``).

        A resumed run without a checkpoint starts over, init included: its new init replaces the old.
        """
        with Session(self.engine) as session, session.begin():
            session.execute(delete(InitRecord).where(InitRecord.run_id == run_id))
            session.add(InitRecord(run_id=run_id, kind=kind, seconds=seconds, bytes_down=bytes_down,
                                   bytes_up=bytes_up, details=details, created_at=utcnow()))

    def record_federated_evaluation(self, run_id: int, evaluation: RoundEvaluation, *, per_node: bool) -> None:
        """The round's aggregate and spread, and (``per_node``) every node's row: one transaction.

        A round evaluated again (a resumed run redoing it) replaces its earlier rows, never adds to them.
        """
        with Session(self.engine) as session, session.begin():
            for table in (NodeEvaluation, FederatedEvaluation):
                session.execute(delete(table).where(table.run_id == run_id, table.round_number == evaluation.number))
            if per_node:
                for n in evaluation.nodes:
                    session.add(NodeEvaluation(
                        run_id=run_id, round_number=evaluation.number, node_id=str(n.node_id), node_key=n.key,
                        status=n.status, reason=n.reason, loss=_finite(n.loss), perplexity=_finite(n.perplexity),
                        num_examples=n.num_examples, tokens=n.tokens, seconds=n.seconds, created_at=utcnow()))
            spread = evaluation.spread()
            if spread:
                session.add(FederatedEvaluation(
                    run_id=run_id, round_number=evaluation.number, nodes=len(evaluation.ok),
                    failed=len(evaluation.nodes) - len(evaluation.ok),
                    num_examples=sum(n.num_examples for n in evaluation.ok), loss=evaluation.loss,
                    perplexity=evaluation.perplexity, worst_loss=spread["worst"], median_loss=spread["median"],
                    best_loss=spread["best"], created_at=utcnow()))

    def record_evaluation(self, run_id: int, round_number: int, evaluation: TimedEval) -> None:
        with Session(self.engine) as session, session.begin():
            session.add(self._evaluation(run_id, round_number, evaluation))

    @staticmethod
    def _evaluation(run_id: int, round_number: int, ev: TimedEval) -> Evaluation:
        return Evaluation(
            run_id=run_id, round_number=round_number, loss=ev.result.loss,
            perplexity=ev.result.perplexity, num_examples=ev.result.examples,
            tokens=ev.result.tokens, seconds=ev.seconds, created_at=utcnow(),
        )

    def finish_run(self, run_id: int, *, status: str, error: str | None = None) -> None:
        with Session(self.engine) as session, session.begin():
            session.execute(
                update(Run).where(Run.id == run_id)
                .values(status=status, error=error, finished_at=utcnow(), updated_at=utcnow())
            )

    def reopen_run(self, run_id: int) -> tuple[Run, CheckpointRecord | None]:
        """Mark a run as running again; return it and its latest checkpoint (if any)."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            run = session.get(Run, run_id)
            if run is None:
                raise ValueError(f"resume-run-id {run_id}: no such run in the database")
            if run.status == "completed":
                raise ValueError(f"run {run_id} already completed; nothing to resume")
            latest = latest_checkpoint_row(session, run_id)
            run.status, run.error, run.finished_at, run.updated_at = "running", None, None, utcnow()
            session.expunge_all()
            return run, latest

    def run_status(self, run_id: int) -> str:
        with Session(self.engine) as session:
            return session.scalar(select(Run.status).where(Run.id == run_id)) or ""



class RecordingStrategy(Strategy):
    """Wraps a LoraStrategy and records every round (see the module docstring)."""

    def __init__(
        self, *, inner: LoraStrategy, recorder: RunRecorder, run_id: int, evaluator: Evaluate | None,
        config: dict[str, Any], checkpoint_dir: Path, keep_checkpoints: int = 3, round_offset: int = 0,
        resumed: bool = False, eval_every: int = 1, eval_overlap: bool = True, node_eval_report: str = "per-node", central: CentralAccount | None = None,
    ) -> None:
        self.inner = inner
        self.recorder = recorder
        self.run_id = run_id
        self.evaluations = None if evaluator is None else EvaluationSchedule(
            evaluate=evaluator, every=eval_every, overlap=eval_overlap,
            record=lambda number, ev: recorder.record_evaluation(run_id, number, ev),
        )
        self.last_round = 0  # set by ``start``
        self.eval_every = eval_every
        self.node_eval_report = node_eval_report
        self.config = dict(config)
        self.checkpoint_dir = checkpoint_dir
        self.keep_checkpoints = keep_checkpoints
        # A resumed run restarts Flower's loop at 1; rounds are numbered from the checkpoint.
        self.round_offset = round_offset
        self.resumed = resumed
        # central DP's user-level ε: checked before each round, charged when a round is aggregated
        self.central = central
        self._sample_rate = 1.0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.central is not None:  # before any node is asked: a round past the budget never starts
            self._sample_rate = sample_rate(self.inner.clients_per_round, len(list(grid.get_node_ids())))
            self.central.check_next(round_number=server_round + self.round_offset, rate=self._sample_rate)
        return self.inner.configure_train(server_round + self.round_offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        result = self.inner.aggregate_train(server_round + self.round_offset, replies)
        report = self.inner.last_report
        if self.central is not None and report is not None and report.aggregated:  # noise was added: one release
            self.central = self.central.charged(self._sample_rate)
        return result

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        number = server_round + self.round_offset
        if not due(number, every=self.eval_every, last=self.last_round):
            return []
        return self.inner.configure_evaluate(number, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = self.inner.aggregate_evaluate(server_round + self.round_offset, replies)
        if self.inner.last_evaluation is not None:
            self.recorder.record_federated_evaluation(self.run_id, self.inner.last_evaluation,
                                                      per_node=self.node_eval_report == "per-node")
        return metrics

    def summary(self) -> None:
        self.inner.summary()

    def _end_of_round(self, flower_round: int, _arrays: ArrayRecord) -> MetricRecord | None:
        if flower_round == 0 and self.resumed:
            return None  # round 0 (and every round up to the checkpoint) is already recorded
        number = flower_round + self.round_offset
        waited = time.perf_counter()
        if self.evaluations is not None:
            self.evaluations.wait()  # the previous round's evaluation is written before this round
        waited = time.perf_counter() - waited  # what an unfinished evaluation held this round up
        if flower_round > 0:
            report = self.inner.last_report
            assert report is not None and report.number == number
            saved = self._save_checkpoint(number)
            stale = self.recorder.record_round(self.run_id, report, None, saved, keep=self.keep_checkpoints,
                                               central_epsilon=self.central.epsilon if self.central else None,
                                               eval_wait_seconds=waited)
            for pruned in stale:
                ckpt.discard(pruned.path, pruned.sha256)
        if self.evaluations is not None:
            self.evaluations.submit(number, merge_log=self.inner.merge_log, last=self.last_round,
                                    global_delta=self.inner.aggregator.global_delta(self.inner.state))
        return None  # evaluations go to the database as they finish, not into Flower's Result

    def _save_checkpoint(self, number: int) -> SavedCheckpoint:
        checkpoint = ckpt.Checkpoint(
            round=number, aggregator=self.config.get("aggregator", ""), state=self.inner.state,
            merge_log=self.inner.merge_log, rng_state=self.inner.rng.bit_generator.state, config=self.config,
            privacy={"central": self.central.to_json()} if self.central else {},
        )
        path, sha = ckpt.save(checkpoint, self.recorder.checkpoint_directory(self.run_id, self.checkpoint_dir))
        return SavedCheckpoint(path=path, sha256=sha, config_hash=checkpoint.config_hash)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        if evaluate_fn is not None:
            raise ValueError("RecordingStrategy evaluates through its evaluator; pass no evaluate_fn")
        self.last_round = self.round_offset + num_rounds
        # the rank query goes out now: nodes answer it (and warm workers load the model)
        # while round 0 is evaluated, so round 1 waits for neither
        self.inner.announce(grid)
        try:
            result = super().start(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config,
                                   evaluate_fn=self._end_of_round)
        except BaseException:
            if self.evaluations is not None:  # keep what finished; the run's own error wins
                with contextlib.suppress(Exception):
                    self.evaluations.wait()
            raise
        if self.evaluations is not None:
            self.evaluations.wait()
        return result

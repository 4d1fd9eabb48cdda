"""SQLAlchemy 2.0 models: runs, rounds, client updates, evaluations. No logic here.

Flower node and run ids are unsigned 64-bit integers; SQLite's INTEGER and
PostgreSQL's BIGINT are signed, so they are stored as decimal strings.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # Unique beyond this database (ids restart at 1 in every one): names the run's
    # checkpoint directory. NULL for runs recorded before schema version 3.
    uuid: Mapped[str | None] = mapped_column(String(32), index=True, unique=True)
    flwr_run_id: Mapped[str | None] = mapped_column(String(20))
    tag: Mapped[str | None] = mapped_column(String(64), index=True)
    aggregator: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(256))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    # running | completed | failed | interrupted | stopped (at its central DP budget: dp-central-epsilon)
    status: Mapped[str] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    updated_at: Mapped[datetime | None] = mapped_column(DateTime)  # last write: tells a stale "running"

    rounds: Mapped[list[RoundRecord]] = relationship(back_populates="run", order_by="RoundRecord.number")


class RoundRecord(Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("run_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime] = mapped_column(DateTime)
    num_sampled: Mapped[int] = mapped_column(Integer)
    num_aggregated: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float | None] = mapped_column(Float)
    relative_error: Mapped[float | None] = mapped_column(Float)
    # user-level ε of central DP spent through this round (at the run's dp-delta); NULL without it
    central_epsilon: Mapped[float | None] = mapped_column(Float)
    bytes_down: Mapped[int] = mapped_column(Integer)
    bytes_up: Mapped[int] = mapped_column(Integer)
    aggregate_seconds: Mapped[float] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)

    run: Mapped[Run] = relationship(back_populates="rounds")
    updates: Mapped[list[ClientUpdateRecord]] = relationship(back_populates="round")


class ClientUpdateRecord(Base):
    __tablename__ = "client_updates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    round_number: Mapped[int] = mapped_column(Integer)
    node_id: Mapped[str] = mapped_column(String(20))
    rank: Mapped[int | None] = mapped_column(Integer)
    num_examples: Mapped[int | None] = mapped_column(Integer)
    train_loss: Mapped[float | None] = mapped_column(Float)
    seconds: Mapped[float | None] = mapped_column(Float)
    bytes_down: Mapped[int] = mapped_column(Integer)
    bytes_up: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(32))  # ok | rejected | failed | resync
    reason: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)

    round: Mapped[RoundRecord] = relationship(back_populates="updates")


class Evaluation(Base):
    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    round_number: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float] = mapped_column(Float)
    perplexity: Mapped[float] = mapped_column(Float)
    num_examples: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[int] = mapped_column(Integer)
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class CheckpointRecord(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("run_id", "round_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    round_number: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    config_hash: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime)


class InitRecord(Base):
    """How a run's adapter was initialised before round 1 (Fed-SB's LoRA-SB init): one row per run.

    ``kind`` is the run's ``sb-init``; ``details`` holds what the init read: the calibration and
    evaluation example ids (server-public), each node's contribution (federated: status, reason,
    bytes, its ε), the sketch sizes.
    """

    __tablename__ = "initialisations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True, unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    seconds: Mapped[float] = mapped_column(Float)
    bytes_down: Mapped[int] = mapped_column(Integer)
    bytes_up: Mapped[int] = mapped_column(Integer)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class SchemaVersion(Base):
    __tablename__ = "schema_version"

    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    applied_at: Mapped[datetime] = mapped_column(DateTime)


class NodeEvaluation(Base):
    """One node's evaluation of a round's global adapter on its own held-out slice (federated
    evaluation). Not written when the run asks for aggregates only (``node-eval-report``)."""

    __tablename__ = "node_evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    round_number: Mapped[int] = mapped_column(Integer)
    node_id: Mapped[str] = mapped_column(String(20))
    node_key: Mapped[str | None] = mapped_column(String(256))
    status: Mapped[str] = mapped_column(String(32))  # ok | failed | resync
    reason: Mapped[str | None] = mapped_column(Text)
    loss: Mapped[float | None] = mapped_column(Float)
    perplexity: Mapped[float | None] = mapped_column(Float)
    num_examples: Mapped[int | None] = mapped_column(Integer)
    tokens: Mapped[int | None] = mapped_column(Integer)
    seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class FederatedEvaluation(Base):
    """A round's federated evaluation: the example-weighted aggregate and the spread across nodes."""

    __tablename__ = "federated_evaluations"
    __table_args__ = (UniqueConstraint("run_id", "round_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    round_number: Mapped[int] = mapped_column(Integer)
    nodes: Mapped[int] = mapped_column(Integer)  # nodes that evaluated ("ok")
    failed: Mapped[int] = mapped_column(Integer)
    num_examples: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float] = mapped_column(Float)  # example-weighted mean of the nodes' losses
    perplexity: Mapped[float] = mapped_column(Float)  # exp(loss)
    worst_loss: Mapped[float] = mapped_column(Float)
    median_loss: Mapped[float] = mapped_column(Float)
    best_loss: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime)

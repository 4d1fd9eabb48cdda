"""Every read of the round log that a command or report makes, in one place.

The recorder (``server.recording``) is the one writer; this is the one reader. Rows
are returned as the ORM objects of ``server.db.models`` (detached from their session
where the caller keeps them); JSON columns are read in Python rather than with JSON
SQL, which differs between SQLite and PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from server.db.models import (
    ClientUpdateRecord, Evaluation, FederatedEvaluation, InitRecord, NodeEvaluation, RoundRecord, Run,
)

#: client statuses that mean a sampled node did not do what it was asked
FAILED_STATUSES = ("failed", "rejected")


def run_by_tag(session: Session, tag: str) -> Run | None:
    return session.scalar(select(Run).where(Run.tag == tag))


def all_runs(session: Session) -> list[Run]:
    return list(session.scalars(select(Run).order_by(Run.id)))


def rounds(session: Session, run_id: int) -> list[RoundRecord]:
    return list(session.scalars(select(RoundRecord).where(RoundRecord.run_id == run_id).order_by(RoundRecord.number)))


def evaluations(session: Session, run_id: int) -> list[Evaluation]:
    """Round 0 (before training) first."""
    return list(session.scalars(select(Evaluation).where(Evaluation.run_id == run_id)
                                .order_by(Evaluation.round_number)))


def node_evaluations(session: Session, run_id: int) -> list[NodeEvaluation]:
    """Every node's federated evaluation row, by round, then by node key."""
    return list(session.scalars(select(NodeEvaluation).where(NodeEvaluation.run_id == run_id)
                                .order_by(NodeEvaluation.round_number, NodeEvaluation.node_key)))


def federated_evaluations(session: Session, run_id: int) -> list[FederatedEvaluation]:
    """Each evaluated round's aggregate and spread across nodes."""
    return list(session.scalars(select(FederatedEvaluation).where(FederatedEvaluation.run_id == run_id)
                                .order_by(FederatedEvaluation.round_number)))


def initialisation(session: Session, run_id: int) -> InitRecord | None:
    """How the run's adapter was initialised (Fed-SB's LoRA-SB init); None for a method without one."""
    return session.scalars(select(InitRecord).where(InitRecord.run_id == run_id)).first()


def client_updates(session: Session, run_id: int) -> list[ClientUpdateRecord]:
    """Every sampled client's row, in round order, then in the order they were recorded."""
    return list(session.scalars(select(ClientUpdateRecord).where(ClientUpdateRecord.run_id == run_id)
                                .order_by(ClientUpdateRecord.round_number, ClientUpdateRecord.id)))


def failed_clients(engine: Engine, run_id: int) -> int:
    """How many sampled clients of the run failed or were rejected (declined is not a failure)."""
    with Session(engine) as session:
        return sum(c.status in FAILED_STATUSES for c in client_updates(session, run_id))


@dataclass(frozen=True, kw_only=True)
class EpsilonSummary:
    epsilon: float  # the largest ε any client reported in the run
    delta: float  # the δ that client reported with it
    clients: int  # how many distinct nodes reported DP figures

    def __post_init__(self) -> None:
        if self.epsilon < 0 or not 0 < self.delta < 1 or self.clients < 1:
            raise ValueError(f"inconsistent DP summary {self}")


def epsilon_points(updates: list[ClientUpdateRecord]) -> dict[str, list[tuple[int, float, float]]]:
    """node -> (round, ε, δ) for every row that carries DP figures.

    Every reply with DP on carries ``dp-epsilon`` (spent so far on that node's data, as
    its ledger holds it), whatever its status: declined, failed after the round was
    reserved, or rejected by the server, a node's ledger was charged all the same. So
    every row carrying it counts.
    """
    points: dict[str, list[tuple[int, float, float]]] = {}
    for u in updates:
        metrics = u.metrics if isinstance(u.metrics, dict) else {}
        if "dp-epsilon" in metrics:
            points.setdefault(u.node_id, []).append(
                (u.round_number, float(metrics["dp-epsilon"]), float(metrics.get("dp-delta", 0.0))))
    return points


def max_epsilon(engine: Engine, run_id: int) -> EpsilonSummary | None:
    """The maximum ε across clients for a run (the worst case); None when no client ran DP."""
    with Session(engine) as session:
        return epsilon_summary(client_updates(session, run_id))


def epsilon_summary(updates: list[ClientUpdateRecord]) -> EpsilonSummary | None:
    """The largest ε among these rows (with its δ and the count of nodes); None without DP figures."""
    points = epsilon_points(updates)
    if not points:
        return None
    _, epsilon, delta = max((p for node in points.values() for p in node), key=lambda p: p[1])
    return EpsilonSummary(epsilon=epsilon, delta=delta, clients=len(points))


def central_epsilon_points(round_rows: list[RoundRecord]) -> list[tuple[int, float]]:
    """(round, user-level ε spent through it) for every round central DP accounted, in round order."""
    return [(r.number, r.central_epsilon) for r in round_rows if r.central_epsilon is not None]


def central_epsilon(session: Session, run_id: int) -> float | None:
    """The user-level ε the run's central DP has spent (its last round's); None without it."""
    points = central_epsilon_points(rounds(session, run_id))
    return points[-1][1] if points else None

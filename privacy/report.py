"""Reading the privacy figures the server recorded (client_updates.metrics JSON)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from server.db.models import ClientUpdateRecord


@dataclass(frozen=True, kw_only=True)
class EpsilonSummary:
    epsilon: float  # the largest ε any client reported in the run
    delta: float  # the δ that client reported with it
    clients: int  # how many distinct nodes reported DP figures

    def __post_init__(self) -> None:
        if self.epsilon < 0 or not 0 < self.delta < 1 or self.clients < 1:
            raise ValueError(f"inconsistent DP summary {self}")


def max_epsilon(engine: Engine, run_id: int) -> EpsilonSummary | None:
    """The maximum ε across clients for a run; None when no client reported DP figures.

    Every reply with DP on carries ``dp-epsilon`` (spent so far on that node's data, as
    its ledger holds it), whatever its status: declined, failed after the round was
    reserved, or rejected by the server, a node's ledger was charged all the same. So
    every row carrying it counts, and the largest is the run's worst case. Read in
    Python rather than with JSON SQL, which differs between SQLite and PostgreSQL.
    """
    with Session(engine) as session:
        rows = session.execute(
            select(ClientUpdateRecord.node_id, ClientUpdateRecord.metrics).where(ClientUpdateRecord.run_id == run_id)
        ).all()
    reported = [(node, m) for node, m in rows if isinstance(m, dict) and "dp-epsilon" in m]
    if not reported:
        return None
    _, worst = max(reported, key=lambda row: float(row[1]["dp-epsilon"]))
    return EpsilonSummary(
        epsilon=float(worst["dp-epsilon"]),
        delta=float(worst["dp-delta"]),
        clients=len({node for node, _ in reported}),
    )

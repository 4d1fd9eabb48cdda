"""What a round produced and what the server believes about each node.

Plain records shared by the strategy (which fills them), the recorder (the only code
that writes them to the database) and the reports; kept apart from the Flower loop so
readers of a round need not import Flower's server side.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from aggregation import Tensors

__all__ = ["CLIENT_STATUSES", "ClientOutcome", "InsufficientReplies", "NodeState", "RoundReport", "tensors_hash",
           "utcnow"]


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


# What a client may answer: trained ("ok"), lacks base updates or frozen factors
# ("resync": the server resends them next time), chose not to train ("declined"), or
# could not ("failed": its node config is invalid, or its round broke; a DP node's
# failed reply still carries the ε its ledger holds, recorded like any reply's metrics).
CLIENT_STATUSES = frozenset({"ok", "resync", "declined", "failed"})


class InsufficientReplies(RuntimeError):
    """Fewer usable replies than min-clients, after the allowed retries."""


@dataclass
class NodeState:
    """What the server believes a node holds; corrected by the node's own replies."""

    key: str
    rank: int
    alpha: float
    num_examples: int
    merged_through: int = 0  # last base-update round the node has folded in
    frozen_hash: str = ""


@dataclass(frozen=True)
class ClientOutcome:
    node_id: int
    status: str  # ok | rejected | failed | resync | declined
    reason: str | None = None
    rank: int | None = None
    num_examples: int | None = None
    train_loss: float | None = None
    seconds: float | None = None
    bytes_down: int = 0
    bytes_up: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundReport:
    number: int
    started_at: datetime
    finished_at: datetime
    outcomes: tuple[ClientOutcome, ...]
    aggregated: bool
    train_loss: float | None
    relative_error: float | None
    aggregate_seconds: float
    attempts: int = 1

    @property
    def bytes_down(self) -> int:
        return sum(o.bytes_down for o in self.outcomes)

    @property
    def bytes_up(self) -> int:
        return sum(o.bytes_up for o in self.outcomes)

    @property
    def num_ok(self) -> int:
        return sum(o.status == "ok" for o in self.outcomes)


def tensors_hash(tensors: Tensors) -> str:
    digest = hashlib.sha256()
    for module in sorted(tensors):
        for factor in sorted(tensors[module]):
            digest.update(f"{module}|{factor}".encode())
            digest.update(np.ascontiguousarray(tensors[module][factor], np.float32).tobytes())
    return digest.hexdigest()[:16]

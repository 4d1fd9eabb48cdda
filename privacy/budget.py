"""Budget enforcement: how many of this round's planned steps a node may take.

Before training, the node projects ε after the round's steps on top of its whole
history. If that would pass the target, the ``dp-on-budget`` policy decides:
``decline`` skips the round (the reply says why, the server records it), ``truncate``
trains as many steps as still fit (declining only when none does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from privacy.accounting import History, affordable_steps


@dataclass(frozen=True, kw_only=True)
class BudgetQuery:
    """What a policy sees: the node's history and this round's planned steps."""

    history: History
    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    target_epsilon: float
    delta: float
    accountant: str

    def __post_init__(self) -> None:
        if self.planned_steps < 1:
            raise ValueError(f"planned steps must be >= 1, got {self.planned_steps}")
        if not self.target_epsilon > 0:
            raise ValueError(f"a budget policy needs a target epsilon > 0, got {self.target_epsilon}")


def _decline(query: BudgetQuery) -> int:
    return 0


def _truncate(query: BudgetQuery) -> int:
    return affordable_steps(
        history=query.history,
        noise_multiplier=query.noise_multiplier,
        sample_rate=query.sample_rate,
        max_steps=query.planned_steps,
        target_epsilon=query.target_epsilon,
        delta=query.delta,
        accountant=query.accountant,
    )


#: policy name -> steps to take when the full round would exceed the target (0: decline)
ON_BUDGET: dict[str, Callable[[BudgetQuery], int]] = {"decline": _decline, "truncate": _truncate}


def check_policy(name: str) -> None:
    if name not in ON_BUDGET:
        raise ValueError(f"unknown dp-on-budget policy {name!r}; valid: {', '.join(sorted(ON_BUDGET))}")


def exhausted_reason(projected: float, target: float) -> str:
    """The reply's reason, in the words the server records and the README documents."""
    return f"budget exhausted: ε would reach {projected:.6g} > target {target:.6g}"

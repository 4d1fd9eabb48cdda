"""One node's round of local DP-SGD: plan against the ledger, train, report.

``private_round`` holds the node's ledger lock for the whole round and yields a
``PrivateRound``. Planning, in order:

1. the noise multiplier: ``dp-noise-multiplier`` if set, else calibrated *once per
   run* so that the node's prior history plus the run's planned steps
   (rounds x local steps, at the Poisson sample rate) reaches exactly ``dp-epsilon``;
   it is stored with the run's key in the ledger and reused every round;
2. the projection: ε after this round's steps on top of the whole history. Above the
   target, the ``dp-on-budget`` policy declines the round or truncates it.

``hook()`` gives the trainer its ``OpacusDPSGD``, which reserves the round's steps in
the ledger before the first step and commits the accountant's history after the last.
``metrics()`` are the numbers the reply carries to the server (and the database).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from privacy.accounting import History, calibrate_noise, compose, epsilon, total_steps
from privacy.budget import ON_BUDGET, BudgetQuery, exhausted_reason
from privacy.dpsgd import DPSGDConfig, OpacusDPSGD, poisson_sample_rate
from privacy.ledger import NoisePlan, PrivacyLedger, dataset_fingerprint
from privacy.settings import DPSettings


class PrivateRound:
    """A planned round; construct it through ``private_round`` (which holds the lock)."""

    def __init__(
        self,
        *,
        settings: DPSettings,
        ledger: PrivacyLedger,
        run_key: str,
        num_examples: int,
        batch_size: int,
        local_steps: int,
        planned_rounds: int,
    ) -> None:
        if local_steps < 1 or planned_rounds < 1:
            raise ValueError(f"need local steps and planned rounds >= 1, got {local_steps} and {planned_rounds}")
        self.settings = settings
        self.ledger = ledger
        self.sample_rate = poisson_sample_rate(num_examples, batch_size)
        state = ledger.load()
        self.history_before: History = state.history
        self.epsilon_before = self._epsilon(state.history)
        self.history_after: History = state.history
        self.steps = 0
        self.reason = ""
        plan = state.plans.get(run_key)
        if plan is None or plan.sample_rate != self.sample_rate:
            if not settings.noise_multiplier and self.epsilon_before >= settings.epsilon:
                # nothing left to calibrate for; project with the last noise used on this data
                self.noise_multiplier = state.history[-1][0]
                self._decline(compose(state.history, self.noise_multiplier, self.sample_rate, local_steps))
                return
            planned = planned_rounds * local_steps
            sigma = settings.noise_multiplier or calibrate_noise(
                target_epsilon=settings.epsilon, delta=settings.delta, sample_rate=self.sample_rate,
                steps=planned, accountant=settings.accountant, prior=state.history,
            )
            plan = NoisePlan(noise_multiplier=sigma, sample_rate=self.sample_rate, planned_steps=planned)
            ledger.save(state.with_plan(run_key, plan))
        self.noise_multiplier = plan.noise_multiplier
        projected = compose(state.history, self.noise_multiplier, self.sample_rate, local_steps)
        if not settings.has_target or self._epsilon(projected) <= settings.epsilon:
            self.steps = local_steps
            return
        self.steps = ON_BUDGET[settings.on_budget](
            BudgetQuery(history=state.history, noise_multiplier=self.noise_multiplier,
                        sample_rate=self.sample_rate, planned_steps=local_steps, target_epsilon=settings.epsilon,
                        delta=settings.delta, accountant=settings.accountant)
        )
        if self.steps == 0:
            self._decline(projected)

    def _epsilon(self, history: History) -> float:
        return epsilon(history, delta=self.settings.delta, accountant=self.settings.accountant)

    def _decline(self, projected: History) -> None:
        self.steps = 0
        self.reason = exhausted_reason(self._epsilon(projected), self.settings.epsilon)

    @property
    def declined(self) -> bool:
        return self.steps == 0

    def hook(self) -> OpacusDPSGD:
        if self.declined:
            raise RuntimeError(f"this round was declined ({self.reason}); there is nothing to train")
        config = DPSGDConfig(
            noise_multiplier=self.noise_multiplier, max_grad_norm=self.settings.max_grad_norm,
            sample_rate=self.sample_rate, steps=self.steps, accountant=self.settings.accountant,
            grad_sample_mode=self.settings.grad_sample_mode, history=self.history_before,
            noise_seed=self.settings.noise_seed, sampling_seed=self.settings.sampling_seed,
        )
        return OpacusDPSGD(config=config, on_reserve=self._record, on_commit=self._record)

    def _record(self, history: History) -> None:
        self.ledger.save(self.ledger.load().with_history(history))
        self.history_after = history

    def metrics(self) -> dict[str, float | int]:
        """What the server records per client: ε so far, this round's increase, the knobs."""
        spent = self._epsilon(self.history_after)
        out: dict[str, float | int] = {
            "dp-epsilon": spent,
            "dp-epsilon-delta": spent - self.epsilon_before,
            "dp-delta": self.settings.delta,
            "dp-noise-multiplier": self.noise_multiplier,
            "dp-sample-rate": self.sample_rate,
            "dp-max-grad-norm": self.settings.max_grad_norm,
            "dp-steps": total_steps(self.history_after) - total_steps(self.history_before),
            "dp-steps-total": total_steps(self.history_after),
        }
        if self.settings.has_target:
            out["dp-epsilon-target"] = self.settings.epsilon
        return out


@contextlib.contextmanager
def private_round(
    *,
    settings: DPSettings,
    node: str,
    examples: Sequence[Any],
    run_key: str,
    batch_size: int,
    local_steps: int,
    planned_rounds: int,
    fingerprint: str | None = None,
) -> Iterator[PrivateRound]:
    """Plan a round for ``node`` on ``examples`` with the ledger locked until it ends.

    The ledger is the one of ``fingerprint`` (the node's whole dataset) when given, else of
    ``examples``: a node that trains on part of its data keeps its data's one ledger.
    """
    dataset = fingerprint if fingerprint is not None else dataset_fingerprint(examples)
    ledger = PrivacyLedger(directory=settings.ledger_directory(), node=node, dataset=dataset)
    with ledger.locked():
        yield PrivateRound(
            settings=settings, ledger=ledger, run_key=run_key, num_examples=len(examples),
            batch_size=batch_size, local_steps=local_steps, planned_rounds=planned_rounds,
        )

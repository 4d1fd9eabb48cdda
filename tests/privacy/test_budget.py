"""Budget enforcement and noise planning, against a ledger (no model needed)."""

from __future__ import annotations

import re

import pytest

from privacy.accounting import compose, epsilon
from privacy.private_round import PrivateRound
from privacy.ledger import PrivacyLedger, dataset_fingerprint
from privacy.settings import DPSettings
from tests.privacy.helpers import examples

DELTA = 1e-5
N, BATCH = 40, 4  # sample rate 1/10


def _ledger(tmp_path, history=()) -> PrivacyLedger:
    ledger = PrivacyLedger(directory=tmp_path, node="partition-3", dataset=dataset_fingerprint(examples(N)))
    if history:
        ledger.save(ledger.empty().with_history(history))
    return ledger


def _round(ledger, *, run="run-1", local_steps=5, planned_rounds=4, **settings) -> PrivateRound:
    kwargs = {"delta": DELTA, "accountant": "rdp", **settings}
    return PrivateRound(settings=DPSettings(**kwargs), ledger=ledger, run_key=run, num_examples=N,
                        batch_size=BATCH, local_steps=local_steps, planned_rounds=planned_rounds)


def _eps(history) -> float:
    return epsilon(history, delta=DELTA, accountant="rdp")


def test_a_round_that_would_pass_the_target_is_declined_with_the_reason(tmp_path):
    history = ((1.0, 0.1, 40),)
    target = _eps(compose(history, 1.0, 0.1, 3))  # room for 3 of the 5 steps
    dp_round = _round(_ledger(tmp_path, history), epsilon=target, noise_multiplier=1.0)
    assert dp_round.declined and dp_round.steps == 0
    match = re.fullmatch(r"budget exhausted: ε would reach ([0-9.e+-]+) > target ([0-9.e+-]+)", dp_round.reason)
    assert match, dp_round.reason
    assert float(match.group(1)) == pytest.approx(_eps(compose(history, 1.0, 0.1, 5)), rel=1e-5)
    assert float(match.group(1)) > float(match.group(2)) == pytest.approx(target, rel=1e-5)
    metrics = dp_round.metrics()
    assert metrics["dp-steps"] == 0 and metrics["dp-epsilon-delta"] == 0
    assert metrics["dp-epsilon"] == pytest.approx(_eps(history))
    with pytest.raises(RuntimeError, match="declined"):
        dp_round.hook()


def test_truncate_trains_the_steps_that_still_fit(tmp_path):
    history = ((1.0, 0.1, 40),)
    target = _eps(compose(history, 1.0, 0.1, 3))
    dp_round = _round(_ledger(tmp_path, history), epsilon=target, noise_multiplier=1.0, on_budget="truncate")
    assert not dp_round.declined and dp_round.steps == 3
    assert dp_round.hook().config.steps == 3
    # and declines once nothing fits
    spent = _round(_ledger(tmp_path / "b", history), epsilon=_eps(history), noise_multiplier=1.0,
                   on_budget="truncate")
    assert spent.declined and spent.reason.startswith("budget exhausted")


def test_noise_is_fixed_once_per_run_from_the_planned_steps(tmp_path):
    ledger = _ledger(tmp_path)
    first = _round(ledger, epsilon=3.0)
    sigma = first.noise_multiplier
    planned = compose((), sigma, 0.1, 4 * 5)  # 4 rounds x 5 steps
    assert 3.0 - 0.01 <= _eps(planned) <= 3.0
    first._record(compose((), sigma, 0.1, 5))  # as the trainer's hook would
    second = _round(ledger, epsilon=3.0)
    assert second.noise_multiplier == sigma and second.steps == 5
    # a new run on the same data: calibrated for what is left, so more noise
    other = _round(ledger, run="run-2", epsilon=3.0)
    assert other.noise_multiplier > sigma
    assert _eps(compose(compose((), sigma, 0.1, 5), other.noise_multiplier, 0.1, 20)) <= 3.0


def test_an_exhausted_history_declines_without_calibrating(tmp_path):
    history = ((0.8, 0.1, 200),)
    dp_round = _round(_ledger(tmp_path, history), epsilon=_eps(history) / 2)
    assert dp_round.declined and "budget exhausted" in dp_round.reason
    assert dp_round.metrics()["dp-epsilon"] == pytest.approx(_eps(history))


def test_without_a_target_nothing_is_declined(tmp_path):
    dp_round = _round(_ledger(tmp_path, ((0.5, 0.1, 10_000),)), noise_multiplier=0.5)
    assert not dp_round.declined and dp_round.steps == 5
    assert "dp-epsilon-target" not in dp_round.metrics()

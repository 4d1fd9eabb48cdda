"""Accounting across rounds, processes and runs: ε composes, the ledger persists."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from core.trainer import TrainConfig, train
from privacy.accounting import (
    affordable_steps,
    calibrate_noise,
    check_history,
    compose,
    epsilon,
    make_accountant,
)
from privacy.private_round import private_round
from privacy.ledger import LedgerState, NoisePlan, PrivacyLedger, dataset_fingerprint
from privacy.settings import DPSettings
from tests.privacy.helpers import adapted, examples, tiny

ROOT = Path(__file__).resolve().parents[2]
DELTA = 1e-5
STEPS_PER_ROUND = 2
DATA = {"n": 24, "offset": 100}
ROUND = {"node": "partition-0", "run_key": "run-a", "batch_size": 4, "local_steps": STEPS_PER_ROUND,
         "planned_rounds": 3}


def _settings(state_dir: Path) -> DPSettings:
    return DPSettings(epsilon=8.0, delta=DELTA, max_grad_norm=1.0, state_dir=str(state_dir), noise_seed=1,
                      sampling_seed=2)


def _one_round(state_dir: Path) -> dict:
    data = examples(**DATA)
    with private_round(settings=_settings(state_dir), examples=data, **ROUND) as dp_round:
        assert not dp_round.declined
        train(adapted("lora"), data, tiny().tokenizer,
              TrainConfig(steps=dp_round.steps, batch_size=4, learning_rate=1e-3, max_len=48, seed=0),
              privacy=dp_round.hook())
        return dp_round.metrics()


def test_epsilon_after_three_rounds_equals_one_accountant_over_all_steps_and_survives_a_restart(tmp_path):
    first, second = _one_round(tmp_path), _one_round(tmp_path)
    # the third round in a fresh process: a new ledger and accountant read the file
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        from tests.privacy.test_accounting import _one_round
        print(json.dumps(_one_round(Path({str(tmp_path)!r}))))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    third = json.loads(done.stdout.strip().splitlines()[-1])

    sigma, rate = first["dp-noise-multiplier"], first["dp-sample-rate"]
    assert second["dp-noise-multiplier"] == third["dp-noise-multiplier"] == sigma  # fixed once per run
    assert rate == 1 / 6 and third["dp-steps-total"] == 3 * STEPS_PER_ROUND

    one_go = PRVAccountant()
    for _ in range(3 * STEPS_PER_ROUND):
        one_go.step(noise_multiplier=sigma, sample_rate=rate)
    assert third["dp-epsilon"] == one_go.get_epsilon(DELTA)
    # composition is not the sum of the per-round figures
    assert first["dp-epsilon"] + second["dp-epsilon-delta"] + third["dp-epsilon-delta"] == pytest.approx(
        third["dp-epsilon"])
    assert third["dp-epsilon"] < 3 * first["dp-epsilon"]
    # calibrated so the planned 3 rounds land just inside the target
    assert 8.0 - 0.05 <= third["dp-epsilon"] <= 8.0

    state = PrivacyLedger(directory=tmp_path, node="partition-0", dataset=dataset_fingerprint(examples(**DATA))).load()
    assert state.history == ((sigma, rate, 3 * STEPS_PER_ROUND),)
    assert state.plans["run-a"].noise_multiplier == sigma


def test_compose_merges_like_opacus_and_the_accountants_agree():
    history = compose(compose((), 1.1, 0.1, 3), 1.1, 0.1, 4)
    assert history == ((1.1, 0.1, 7),)
    assert compose(history, 1.2, 0.1, 2) == ((1.1, 0.1, 7), (1.2, 0.1, 2))
    assert compose(history, 1.2, 0.1, 0) == history
    for name, cls in (("prv", PRVAccountant), ("rdp", RDPAccountant)):
        reference = cls()
        reference.history = [(1.1, 0.1, 7), (1.2, 0.1, 2)]
        assert epsilon(compose(history, 1.2, 0.1, 2), delta=DELTA, accountant=name) == reference.get_epsilon(DELTA)
        assert make_accountant(name, history).history == [(1.1, 0.1, 7)]
    assert epsilon((), delta=DELTA, accountant="prv") == 0.0
    assert epsilon(((0.0, 0.1, 1),), delta=DELTA, accountant="prv") == float("inf")


def test_calibration_matches_opacus_without_history_and_composes_with_it():
    ours = calibrate_noise(target_epsilon=4.0, delta=DELTA, sample_rate=0.05, steps=30, accountant="rdp")
    theirs = get_noise_multiplier(target_epsilon=4.0, target_delta=DELTA, sample_rate=0.05, steps=30,
                                  accountant="rdp")
    assert ours == pytest.approx(theirs, rel=0.02)
    assert 4.0 - 0.01 <= epsilon(((ours, 0.05, 30),), delta=DELTA, accountant="rdp") <= 4.0
    prior = ((1.0, 0.05, 20),)
    with_prior = calibrate_noise(target_epsilon=4.0, delta=DELTA, sample_rate=0.05, steps=30, accountant="rdp",
                                 prior=prior)
    assert with_prior > ours  # less budget left, more noise
    assert epsilon(compose(prior, with_prior, 0.05, 30), delta=DELTA, accountant="rdp") <= 4.0
    spent = epsilon(prior, delta=DELTA, accountant="rdp")
    with pytest.raises(ValueError, match="exhausted"):
        calibrate_noise(target_epsilon=spent, delta=DELTA, sample_rate=0.05, steps=1, accountant="rdp", prior=prior)


def test_affordable_steps_is_the_largest_count_within_the_target():
    history = ((1.0, 0.1, 10),)
    target = epsilon(compose(history, 1.0, 0.1, 7), delta=DELTA, accountant="rdp")
    steps = affordable_steps(history=history, noise_multiplier=1.0, sample_rate=0.1, max_steps=20,
                             target_epsilon=target, delta=DELTA, accountant="rdp")
    assert steps == 7
    assert affordable_steps(history=history, noise_multiplier=1.0, sample_rate=0.1, max_steps=5,
                            target_epsilon=target, delta=DELTA, accountant="rdp") == 5


def test_ledger_writes_atomically_and_a_new_object_reads_the_same_history(tmp_path):
    fingerprint = dataset_fingerprint(examples(5))
    ledger = PrivacyLedger(directory=tmp_path / "p", node="node a/1", dataset=fingerprint)
    assert ledger.load().history == ()
    state = ledger.empty().with_history(((1.0, 0.2, 3),)).with_plan(
        "run", NoisePlan(noise_multiplier=1.0, sample_rate=0.2, planned_steps=9))
    with ledger.locked():
        ledger.save(state)
    assert [p.name for p in (tmp_path / "p").iterdir() if p.name.endswith(".tmp")] == []
    again = PrivacyLedger(directory=tmp_path / "p", node="node a/1", dataset=fingerprint).load()
    assert again == state
    # another dataset on the same node, or another node, is another file
    other = PrivacyLedger(directory=tmp_path / "p", node="node a/1", dataset=dataset_fingerprint(examples(6)))
    assert other.path != ledger.path and other.load().history == ()
    assert PrivacyLedger(directory=tmp_path / "p", node="node b", dataset=fingerprint).path != ledger.path


def test_a_damaged_ledger_is_an_error_not_a_fresh_budget(tmp_path):
    ledger = PrivacyLedger(directory=tmp_path, node="n", dataset=dataset_fingerprint(examples(3)))
    ledger.save(ledger.empty().with_history(((1.0, 0.5, 2),)))
    ledger.path.write_text(ledger.path.read_text()[:-20])
    with pytest.raises(ValueError, match="refusing to start from an empty history"):
        ledger.load()
    data = json.loads(json.dumps(ledger.empty().to_json()))
    data["history"] = [[1.0, 0.5, -2]]
    ledger.path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="steps -2"):
        ledger.load()


def test_fingerprint_ignores_order_but_not_content():
    data = examples(6)
    assert dataset_fingerprint(data) == dataset_fingerprint(list(reversed(data)))
    assert dataset_fingerprint(data) != dataset_fingerprint(data[:5])
    assert dataset_fingerprint(data) != dataset_fingerprint(data + data[:1])


def test_history_validation_names_the_entry():
    with pytest.raises(ValueError, match="entry 1"):
        check_history([(1.0, 0.1, 2), (1.0, 1.5, 2)])
    with pytest.raises(ValueError, match="sha256"):
        LedgerState(node="n", dataset="nope")

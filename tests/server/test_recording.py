"""RecordingStrategy's central DP account: checked before a round, charged per aggregated round,
recorded on the round's row and kept in the checkpoint, so a resume continues it."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from sqlalchemy.orm import Session

from privacy.accounting import CentralAccount, CentralBudgetExhausted, epsilon
from server import checkpoint as ckpt
from server.db import read
from server.db.session import open_database
from server.recording import RecordingStrategy, RunRecorder, latest_checkpoint_row
from server.rounds import ClientOutcome, RoundReport

NODES, PER_ROUND, SIGMA, DELTA = 10, 4, 1.0, 1e-5
RATE = PER_ROUND / NODES


class _Grid:
    def get_node_ids(self) -> list[int]:
        return list(range(1, NODES + 1))


class _Inner:
    """What RecordingStrategy calls on its LoraStrategy; a round aggregates unless told otherwise."""

    def __init__(self) -> None:
        self.clients_per_round = PER_ROUND
        self.state = None
        self.merge_log: list = []
        self.rng = np.random.default_rng(0)
        self.last_report: RoundReport | None = None
        self.configured: list[int] = []
        self.aggregates = True

    def configure_train(self, server_round, arrays, config, grid):
        self.configured.append(server_round)
        return []

    def aggregate_train(self, server_round, replies):
        now = datetime(2026, 1, 1)
        ok = ClientOutcome(1, "ok", rank=4, num_examples=3, train_loss=1.0, seconds=1.0)
        self.last_report = RoundReport(number=server_round, started_at=now, finished_at=now, outcomes=(ok,),
                                       aggregated=self.aggregates, train_loss=1.0, relative_error=0.0,
                                       aggregate_seconds=0.0)
        return ArrayRecord(), None


def _expected(rounds: int) -> float:
    return epsilon(((SIGMA, RATE, rounds),), delta=DELTA, accountant="rdp")


def _strategy(tmp_path, *, budget: float, offset: int = 0, central: CentralAccount | None = None):
    recorder = RunRecorder(open_database(f"sqlite:///{tmp_path}/r.db"))
    run_id = 1 if offset else recorder.start_run(config={"aggregator": "fedavg"}, aggregator="fedavg", model="tiny",
                                                 tag="t", flwr_run_id=None)
    account = central or CentralAccount(noise_multiplier=SIGMA, delta=DELTA, accountant="rdp", budget=budget)
    return RecordingStrategy(inner=_Inner(), recorder=recorder, run_id=run_id, evaluator=None,
                             config={"aggregator": "fedavg"}, checkpoint_dir=tmp_path / "ckpt", round_offset=offset,
                             resumed=bool(offset), central=account)


def _round(strategy: RecordingStrategy, flower_round: int) -> None:
    """What Flower's loop calls for one round."""
    strategy.configure_train(flower_round, ArrayRecord(), ConfigRecord(), _Grid())
    strategy.aggregate_train(flower_round, [])
    strategy._end_of_round(flower_round, ArrayRecord())


def test_rounds_are_charged_recorded_and_the_one_past_the_budget_never_starts(tmp_path):
    strategy = _strategy(tmp_path, budget=(_expected(2) + _expected(3)) / 2)
    _round(strategy, 1)
    _round(strategy, 2)
    with pytest.raises(CentralBudgetExhausted, match="round 3 would bring user-level ε"):
        strategy.configure_train(3, ArrayRecord(), ConfigRecord(), _Grid())
    assert strategy.inner.configured == [1, 2]  # no node was asked to train round 3
    with Session(strategy.recorder.engine) as s:
        points = read.central_epsilon_points(read.rounds(s, strategy.run_id))
        assert read.central_epsilon(s, strategy.run_id) == pytest.approx(_expected(2))
    assert [n for n, _ in points] == [1, 2]
    assert [e for _, e in points] == pytest.approx([_expected(1), _expected(2)], rel=1e-12)


def test_a_round_that_did_not_aggregate_releases_nothing_and_is_not_charged(tmp_path):
    strategy = _strategy(tmp_path, budget=0.0)
    _round(strategy, 1)
    strategy.inner.aggregates = False  # on-insufficient=skip: the global state did not change
    _round(strategy, 2)
    assert strategy.central.rounds == 1
    with Session(strategy.recorder.engine) as s:
        assert [e for _, e in read.central_epsilon_points(read.rounds(s, 1))] == pytest.approx([_expected(1)] * 2)


def test_the_checkpoint_carries_the_account_and_a_resume_continues_it(tmp_path):
    first = _strategy(tmp_path, budget=0.0)
    _round(first, 1)
    _round(first, 2)
    with Session(first.recorder.engine) as s:
        row = latest_checkpoint_row(s, first.run_id)
    saved = ckpt.load(Path(row.path), row.sha256)
    assert saved.privacy["central"]["history"] == [[SIGMA, RATE, 2]]
    # what server.app does on a resume: a fresh account, restored from the checkpoint
    fresh = CentralAccount(noise_multiplier=SIGMA, delta=DELTA, accountant="rdp")
    resumed = _strategy(tmp_path, budget=0.0, offset=saved.round,
                        central=fresh.restored(saved.privacy.get("central"), rounds=saved.round))
    _round(resumed, 1)  # Flower's round 1 is the run's round 3
    assert resumed.inner.configured == [3]
    with Session(resumed.recorder.engine) as s:
        points = read.central_epsilon_points(read.rounds(s, 1))
    assert [n for n, _ in points] == [1, 2, 3]
    assert points[-1][1] == pytest.approx(_expected(3), rel=1e-12)  # one accountant over all three rounds


def test_without_central_dp_nothing_is_accounted(tmp_path):
    recorder = RunRecorder(open_database(f"sqlite:///{tmp_path}/r.db"))
    run_id = recorder.start_run(config={}, aggregator="fedavg", model="tiny", tag="t", flwr_run_id=None)
    strategy = RecordingStrategy(inner=_Inner(), recorder=recorder, run_id=run_id, evaluator=None, config={},
                                 checkpoint_dir=tmp_path / "ckpt")
    _round(strategy, 1)
    with Session(recorder.engine) as s:
        assert read.central_epsilon(s, run_id) is None
        row = latest_checkpoint_row(s, run_id)
    assert ckpt.load(Path(row.path), row.sha256).privacy == {}

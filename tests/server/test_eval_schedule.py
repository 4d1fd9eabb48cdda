"""The evaluation schedule: which rounds, overlapped with the next round, recorded against its own round."""

from __future__ import annotations

import threading

import pytest

from core.trainer import EvalResult
from server.eval_schedule import EvaluationSchedule, due
from server.evaluate import TimedEval


def _ev(loss: float) -> TimedEval:
    return TimedEval(EvalResult(loss=loss, perplexity=2.0 ** loss, tokens=10, examples=2), seconds=0.0)


def test_round_0_every_kth_and_the_last_round_are_due():
    assert [r for r in range(0, 8) if due(r, every=3, last=7)] == [0, 3, 6, 7]
    assert [r for r in range(0, 4) if due(r, every=1, last=3)] == [0, 1, 2, 3]


def test_an_evaluation_overlaps_the_next_round_and_is_recorded_against_its_own():
    release, started, recorded = threading.Event(), threading.Event(), []

    def evaluate(merges, delta):
        started.set()
        assert release.wait(10)
        return _ev(float(delta["round"]))

    schedule = EvaluationSchedule(evaluate=evaluate, record=lambda n, ev: recorded.append((n, ev.result.loss)),
                                  every=1)
    merge_log = [(1, {"m": 1})]
    schedule.submit(0, merge_log=merge_log, global_delta={"round": 0}, last=2)
    assert started.wait(10)
    merge_log.append((2, {"m": 2}))  # the strategy moves on: the snapshot is unaffected
    assert recorded == []  # round 1 trains while round 0 is still being evaluated
    release.set()
    schedule.submit(1, merge_log=merge_log, global_delta={"round": 1}, last=2)
    schedule.submit(2, merge_log=merge_log, global_delta={"round": 2}, last=2)  # the last: synchronous
    assert recorded == [(0, 0.0), (1, 1.0), (2, 2.0)]


def test_an_evaluation_sees_the_log_as_it_was_at_its_round():
    seen = []
    schedule = EvaluationSchedule(evaluate=lambda m, d: seen.append(len(m)) or _ev(0.0), record=lambda *_: None,
                                  every=1)
    log = [(1, {})]
    schedule.submit(1, merge_log=log, global_delta={}, last=3)
    log.append((2, {}))
    schedule.wait()
    assert seen == [1]


def test_a_failed_evaluation_fails_the_run_at_the_next_join():
    def evaluate(merges, delta):
        raise RuntimeError("evaluation broke")

    schedule = EvaluationSchedule(evaluate=evaluate, record=lambda *_: None, every=1)
    schedule.submit(0, merge_log=[], global_delta={}, last=3)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        schedule.wait()


def test_eval_every_is_checked():
    with pytest.raises(ValueError, match="eval-every"):
        EvaluationSchedule(evaluate=lambda m, d: _ev(0.0), record=lambda *_: None, every=0)

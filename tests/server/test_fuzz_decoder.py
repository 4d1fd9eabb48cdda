"""Hostile or broken payloads: the decoder rejects them with an error, the server survives."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aggregation
from aggregation import ModelSpec, ModuleShape
from server.strategy import LoraStrategy
from core.wire import PayloadError, record_to_tensors
from server.local_grid import FakeGrid, reply_from, task_identity

SHAPES = {"l0.q": ModuleShape(8, 6)}
dtypes = st.sampled_from(["float32", "float16", "float64", "<f4", "int8", "bogus", "", "object", "V8"])
shapes = st.lists(st.integers(-2, 50), min_size=0, max_size=3).map(tuple)
keys = st.text(min_size=0, max_size=20)


@st.composite
def arrays(draw):
    return Array(dtype=draw(dtypes), shape=draw(shapes), stype="numpy.ndarray", data=draw(st.binary(max_size=256)))


@settings(max_examples=300, deadline=None)
@given(record=st.dictionaries(keys, arrays(), max_size=4))
def test_decoder_raises_only_payload_errors(record):
    try:
        tensors = record_to_tensors(ArrayRecord(record))
    except PayloadError:
        return
    for factors in tensors.values():
        for value in factors.values():
            assert value.dtype in (np.float32, np.float16)


def test_truncated_array_bytes_are_rejected():
    good = Array(np.arange(12, dtype=np.float32).reshape(3, 4))
    cut = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[: len(good.data) // 2])
    with pytest.raises(PayloadError, match="l0.q\\|A"):
        record_to_tensors(ArrayRecord({"l0.q|A": cut}))


metric_values = st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=True), st.lists(st.integers(), max_size=2))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    update=st.dictionaries(keys, arrays(), max_size=3),
    metrics=st.dictionaries(st.sampled_from(["num-examples", "train-loss", "merged-through", "x"]), metric_values),
    status=st.sampled_from(["ok", "resync", "declined", "weird", ""]),
)
def test_hostile_replies_never_crash_the_strategy_or_touch_its_state(update, metrics, status):
    task_identity()
    grid = FakeGrid({1: 4})
    strategy = LoraStrategy(aggregator=aggregation.create("fedavg"), spec=ModelSpec(modules=SHAPES, max_rank=8),
                            train_config={}, clients_per_round=1, min_clients=1, on_insufficient="skip")
    (msg,) = strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)
    before = strategy.state
    content = RecordDict({"update": ArrayRecord(update), "metrics": MetricRecord(metrics),
                          "status": ConfigRecord({"status": status})})
    strategy.aggregate_train(1, [reply_from(1, content, msg)])
    (outcome,) = strategy.last_report.outcomes
    assert outcome.status != "ok" and outcome.reason
    assert strategy.state is before

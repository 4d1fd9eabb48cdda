import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from core.wire import (
    PayloadError,
    merges_to_record,
    record_to_merges,
    record_to_tensors,
    tensors_to_record,
)


def _tensors(rng, ranks):
    return {
        f"model.layers.{i}.self_attn.q_proj": {
            "A": rng.normal(size=(r, 10)).astype(np.float32),
            "B": rng.normal(size=(6, r)).astype(np.float32),
        }
        for i, r in enumerate(ranks)
    }


def test_round_trip_with_mixed_ranks_is_bitwise():
    rng = np.random.default_rng(0)
    tensors = _tensors(rng, [1, 4, 16])
    back = record_to_tensors(tensors_to_record(tensors))
    assert back.keys() == tensors.keys()
    for m in tensors:
        for f in tensors[m]:
            np.testing.assert_array_equal(back[m][f], tensors[m][f])


def test_merge_log_round_trip_keeps_rounds_apart():
    rng = np.random.default_rng(1)
    log = [(1, _tensors(rng, [3])), (4, _tensors(rng, [5]))]
    back = record_to_merges(merges_to_record(log))
    assert sorted(back) == [1, 4]
    assert back[4]["model.layers.0.self_attn.q_proj"]["A"].shape == (5, 10)


def test_bf16_like_or_integer_payload_is_rejected_with_its_key():
    record = ArrayRecord({"m|A": Array(np.arange(4, dtype=np.int64))})
    with pytest.raises(PayloadError, match="'m\\|A'.*int64"):
        record_to_tensors(record)


def test_malformed_key_is_rejected():
    record = ArrayRecord({"noseparator": Array(np.zeros(2, np.float32))})
    with pytest.raises(PayloadError, match="noseparator"):
        record_to_tensors(record)

import numpy as np
import pytest

import aggregation
from server import checkpoint as ckpt
from tests.aggregation.helpers import random_updates, spec


def _checkpoint(round_=3):
    agg = aggregation.create("fedex-lora")
    state = agg.init_state(spec(max_rank=4))
    result = agg.aggregate(state, random_updates(0, [2, 4], alphas=[4.0, 8.0]))
    rng = np.random.default_rng(5)
    rng.random(7)
    return ckpt.Checkpoint(round=round_, aggregator="fedex-lora", state=result.state,
                           merge_log=[(1, result.base_update), (2, result.base_update)],
                           rng_state=rng.bit_generator.state, config={"aggregator": "fedex-lora", "seed": 0})


def test_save_load_round_trip_is_bitwise(tmp_path):
    original = _checkpoint()
    path, sha = ckpt.save(original, tmp_path, run_id=7)
    loaded = ckpt.load(path, sha)
    assert loaded.round == 3 and loaded.config == original.config
    for name, f in original.state.factors.items():
        for k, v in f.items():
            assert np.array_equal(loaded.state.factors[name][k], v)
    assert [r for r, _ in loaded.merge_log] == [1, 2]
    a = np.random.default_rng(); a.bit_generator.state = original.rng_state
    b = np.random.default_rng(); b.bit_generator.state = loaded.rng_state
    assert np.array_equal(a.random(5), b.random(5))  # sampling continues identically
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_corrupt_checkpoint_is_refused(tmp_path):
    path, sha = ckpt.save(_checkpoint(), tmp_path, run_id=1)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        ckpt.load(path, sha)


def test_config_hash_ignores_only_volatile_keys():
    base = {"aggregator": "flora", "seed": 1, "db-url": "sqlite:///a", "resume-run-id": 0}
    assert ckpt.config_hash(base) == ckpt.config_hash({**base, "db-url": "postgresql://x", "resume-run-id": 4})
    assert ckpt.config_hash(base) != ckpt.config_hash({**base, "seed": 2})

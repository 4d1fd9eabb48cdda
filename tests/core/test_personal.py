"""A node's personal factors on disk: round trip, atomic replace, refusals that name the problem."""

from __future__ import annotations

import numpy as np
import pytest

from core.personal import PersonalFactors, PersonalStore


def _factors(seed: int, server_round: int = 1) -> PersonalFactors:
    rng = np.random.default_rng(seed)
    tensors = {"model.layers.0.self_attn.q_proj": {"B": rng.normal(size=(6, 2)).astype(np.float32)},
               "model.layers.0.self_attn.v_proj": {"B": rng.normal(size=(4, 2)).astype(np.float32)}}
    return PersonalFactors(tensors=tensors, rank=2, alpha=4.0, server_round=server_round)


def test_round_trip_is_bitwise_and_a_new_round_replaces_the_file(tmp_path):
    store = PersonalStore(directory=tmp_path, run_key="0123abcd", node="partition-3")
    assert store.load() is None
    store.save(_factors(0))
    store.save(_factors(1, server_round=2))
    got = store.load()
    want = _factors(1, server_round=2)
    assert (got.rank, got.alpha, got.server_round) == (2, 4.0, 2)
    for name, f in want.tensors.items():
        np.testing.assert_array_equal(got.tensors[name]["B"], f["B"])
    assert [p.name for p in store.path.parent.iterdir()] == ["partition-3.npz"]  # no temporary left


def test_an_unreadable_file_is_an_error_naming_it(tmp_path):
    store = PersonalStore(directory=tmp_path, run_key="r1", node="n1")
    store.path.parent.mkdir(parents=True)
    store.path.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="n1.npz cannot be read"):
        store.load()


@pytest.mark.parametrize("run_key, node", [("../up", "n1"), ("r1", "a/b"), ("", "n1")])
def test_names_that_are_not_plain_file_names_are_refused(tmp_path, run_key, node):
    with pytest.raises(ValueError, match="not a safe file name"):
        PersonalStore(directory=tmp_path, run_key=run_key, node=node)

"""Central (user-level) DP: the CentralDP aggregator wrapper and the client-side clip."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import aggregation
from aggregation.base import Aggregator, ClientInfo, ClientUpdate, ModelSpec, ModuleShape
from privacy.central import CentralDP, check_central_dp, clip_update, folded_delta_norm

# the capability each class declares, not a name table
SUM_AGGREGATORS = aggregation.weighted_sum_names()

MODULES = {"layer0.q": ModuleShape(d_out=12, d_in=10), "layer0.v": ModuleShape(d_out=6, d_in=10)}
SPEC = ModelSpec(modules=MODULES, max_rank=4, seed=0)


def _trained_state(inner: Aggregator, seed: int = 0):
    """A state after one plain round, so the downlinks are not all zero."""
    state = inner.init_state(SPEC)
    return inner.aggregate(state, _updates(inner, state, ranks=[4, 2], counts=[3, 5], seed=seed + 100)).state


def _updates(inner: Aggregator, state, *, ranks, counts, seed: int, size: float = 0.1, alpha: float = 8.0):
    """Each client uploads what it was sent plus a random step."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (rank, n) in enumerate(zip(ranks, counts, strict=True)):
        sent = inner.downlink(state, ClientInfo(node_id=f"n{i}", rank=rank, alpha=alpha)).adapter
        tensors = {
            name: {k: np.asarray(sent[name][k]) + size * rng.normal(size=np.shape(sent[name][k])) for k in inner.uplink}
            for name in MODULES
        }
        out.append(ClientUpdate(node_id=f"n{i}", num_examples=n, rank=rank, alpha=alpha, tensors=tensors))
    return out


def _assert_same_state(a, b, *, atol=0.0):
    for name in MODULES:
        assert a.factors[name].keys() == b.factors[name].keys()
        for key in a.factors[name]:
            np.testing.assert_allclose(a.factors[name][key], b.factors[name][key], rtol=0, atol=atol)


@pytest.mark.parametrize("name", sorted(SUM_AGGREGATORS))
def test_zero_noise_and_huge_clip_equal_the_inner_aggregator(name):
    inner = aggregation.create(name)
    wrapped = CentralDP(inner=aggregation.create(name), clip=1e12, noise_multiplier=0.0, weighting="examples")
    assert isinstance(wrapped, Aggregator) and wrapped.uplink == inner.uplink
    state = _trained_state(inner)
    updates = _updates(inner, state, ranks=[4, 2, 3], counts=[3, 9, 5], seed=1)
    _assert_same_state(wrapped.aggregate(state, updates).state, inner.aggregate(state, updates).state)
    # uniform weighting (the default) is the inner aggregator with equal example counts
    uniform = CentralDP(inner=aggregation.create(name), clip=1e12, noise_multiplier=0.0)
    equal = [dataclasses.replace(u, num_examples=7) for u in updates]
    _assert_same_state(uniform.aggregate(state, updates).state, inner.aggregate(state, equal).state)


@pytest.mark.parametrize("name", sorted(SUM_AGGREGATORS))
def test_the_clip_bounds_each_clients_contribution(name):
    inner = aggregation.create(name)
    clip = 0.05
    wrapped = CentralDP(inner=inner, clip=clip, noise_multiplier=0.0)
    state = _trained_state(inner)
    updates = _updates(inner, state, ranks=[4, 4, 4], counts=[1, 1, 1], seed=2, size=1.0)
    huge = dataclasses.replace(updates[0], tensors={
        m: {k: v * 1e6 for k, v in f.items()} for m, f in updates[0].tensors.items()
    })
    # the same round with client 0 replaced by one that returns exactly what it was sent
    sent = inner.downlink(state, updates[0].info).adapter
    idle = dataclasses.replace(updates[0], tensors={m: {k: sent[m][k] for k in inner.uplink} for m in MODULES})
    with_huge = wrapped.aggregate(state, [huge, *updates[1:]]).state
    without = wrapped.aggregate(state, [idle, *updates[1:]]).state
    # difference in the aggregate's (folded) coordinates: at most clip / m
    diff = np.sqrt(sum(
        np.sum((np.asarray(with_huge.factors[m][k]) - np.asarray(without.factors[m][k])) ** 2)
        for m in MODULES for k in inner.uplink
    ))
    assert diff <= clip / 3 * (1 + 1e-9), (diff, clip / 3)
    assert diff > 0.9 * clip / 3  # the huge update was clipped to the bound, not dropped


def test_noise_is_calibrated_per_coordinate():
    inner = aggregation.create("fedavg")
    clip, z = 0.5, 2.0
    wrapped = CentralDP(inner=inner, clip=clip, noise_multiplier=z, seed=0)
    quiet = CentralDP(inner=aggregation.create("fedavg"), clip=clip, noise_multiplier=0.0)
    state = _trained_state(inner)
    updates = _updates(inner, state, ranks=[4, 2], counts=[1, 1], seed=3)
    noise = np.stack([
        np.asarray(wrapped.aggregate(state, updates).state.factors["layer0.q"]["A"])
        - np.asarray(quiet.aggregate(state, updates).state.factors["layer0.q"]["A"])
        for _ in range(200)
    ])
    # FedAvg averages each component over the clients that hold it (aggregation.linalg
    # holder_weighted_mean), so the weight of one client there, and the noise, follow:
    # rows 0-1 both clients hold, weight 1/2 each: std z * C / 2
    assert np.std(noise[:, :2]) == pytest.approx(z * clip / 2, rel=0.05)
    # rows 2-3 only the rank-4 client holds, weight 1: std z * C (not z * C / 2: that
    # would under-noise the one client whose update moves those rows by its full size)
    assert np.std(noise[:, 2:]) == pytest.approx(z * clip, rel=0.05)
    assert wrapped.last_noise_std == pytest.approx(z * clip)


def test_fed_sb_noise_follows_the_entrywise_renormalisation():
    inner = aggregation.create("fed-sb")
    wrapped = CentralDP(inner=inner, clip=1.0, noise_multiplier=1.0, seed=0)
    quiet = CentralDP(inner=aggregation.create("fed-sb"), clip=1.0, noise_multiplier=0.0)
    state = inner.init_state(SPEC)
    updates = _updates(inner, state, ranks=[1, 2], counts=[1, 1], seed=4)
    draws = np.stack([
        np.asarray(wrapped.aggregate(state, updates).state.factors["layer0.q"]["R"])
        - np.asarray(quiet.aggregate(state, updates).state.factors["layer0.q"]["R"])
        for _ in range(400)
    ])
    std = draws.std(axis=0)
    assert std[0, 0] == pytest.approx(0.5, rel=0.15)  # both clients trained (0, 0): weight 1/2
    assert std[1, 1] == pytest.approx(1.0, rel=0.15)  # only the rank-2 client: weight 1
    assert np.all(std[2:, :] == 0) and np.all(std[:, 2:] == 0)  # nobody trained: nothing released


@pytest.mark.parametrize("name", [n for n in aggregation.names() if n not in SUM_AGGREGATORS])
def test_non_sum_aggregators_are_refused_with_the_reason(name):
    with pytest.raises(ValueError, match=f"not available for aggregator '{name}'"):
        CentralDP(inner=aggregation.create(name), clip=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError) as err:
        check_central_dp("flora")
    assert "concatenation" in str(err.value)


def test_central_dp_is_refused_for_flora_in_the_run_config():
    from core.config import RunConfig
    from privacy.settings import parse_run_config

    with pytest.raises(ValueError, match="concatenation"):
        parse_run_config(RunConfig(aggregator="flora", dp_central_clip=1.0, dp_central_noise=1.0).to_flower())
    assert parse_run_config(RunConfig(aggregator="fed-sb", dp_central_clip=1.0,
                                      dp_central_noise=1.0).to_flower()).dp_central_clip == 1.0


def test_make_aggregator_wraps_only_when_central_dp_is_configured():
    from server.app import make_aggregator
    from core.config import RunConfig

    plain = make_aggregator(RunConfig(aggregator="ffa-lora"), base=None)
    wrapped = make_aggregator(RunConfig(aggregator="ffa-lora", dp_central_clip=0.1, dp_central_noise=1.0), base=None)
    assert not isinstance(plain, CentralDP)
    assert isinstance(wrapped, CentralDP) and wrapped.name == "ffa-lora" and wrapped.noise_multiplier == 1.0


def test_client_side_clip_scales_the_folded_update_and_leaves_inputs_alone():
    rng = np.random.default_rng(5)
    sent = {"m": {"A": rng.normal(size=(2, 5)), "B": rng.normal(size=(4, 2))}}
    uploaded = {"m": {k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in sent["m"].items()}}
    before = {k: v.copy() for k, v in uploaded["m"].items()}
    scale = 3.0
    norm = folded_delta_norm(uploaded, sent, scale=scale)
    manual = np.sqrt(np.sum((uploaded["m"]["A"] - sent["m"]["A"]) ** 2)
                     + np.sum((scale * (uploaded["m"]["B"] - sent["m"]["B"])) ** 2))
    assert norm == pytest.approx(manual, rel=1e-6)
    clipped = clip_update(uploaded, sent, scale=scale, bound=norm / 4)
    assert folded_delta_norm(clipped, sent, scale=scale) == pytest.approx(norm / 4, rel=1e-5)
    assert clipped["m"]["A"].dtype == np.float32
    for k, value in before.items():
        np.testing.assert_array_equal(uploaded["m"][k], value)  # no mutation
    within = clip_update(uploaded, sent, scale=scale, bound=norm * 2)
    for k in before:
        np.testing.assert_array_equal(within["m"][k], uploaded["m"][k])  # bit-identical when within
    with pytest.raises(ValueError, match="> 0"):
        clip_update(uploaded, sent, scale=scale, bound=0.0)

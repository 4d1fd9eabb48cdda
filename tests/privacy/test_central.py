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


# --- user-level ε: the account central DP keeps (privacy.accounting.CentralAccount) ---------


def _opacus_epsilon(kind: str, steps: list[tuple[float, float]], delta: float) -> float:
    """An independent accountant, stepped once per round as Opacus's own API does it."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    accountant = {"prv": PRVAccountant, "rdp": RDPAccountant}[kind]()
    for sigma, rate in steps:
        accountant.step(noise_multiplier=sigma, sample_rate=rate)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_central_epsilon_matches_an_independent_opacus_accountant(kind):
    from privacy.accounting import CentralAccount, sample_rate

    rate = sample_rate(4, 10)  # 4 clients per round of 10 nodes
    assert rate == 0.4 and sample_rate(4, 3) == 1.0 and sample_rate(4, 4) == 1.0
    account = CentralAccount(noise_multiplier=1.1, delta=1e-5, accountant=kind)
    assert account.epsilon == 0.0
    for _ in range(5):
        account = account.charged(rate)
    assert account.rounds == 5
    assert account.epsilon == pytest.approx(_opacus_epsilon(kind, [(1.1, 0.4)] * 5, 1e-5), rel=1e-9)
    # a round at another rate (fewer nodes connected) composes after the others
    account = account.charged(1.0)
    assert account.epsilon == pytest.approx(_opacus_epsilon(kind, [(1.1, 0.4)] * 5 + [(1.1, 1.0)], 1e-5), rel=1e-9)


def test_the_budget_refuses_the_round_that_would_pass_it_and_no_earlier_one():
    from privacy.accounting import CentralAccount, CentralBudgetExhausted

    free = CentralAccount(noise_multiplier=1.0, delta=1e-5, accountant="rdp")
    after = [free]
    for _ in range(3):
        after.append(after[-1].charged(0.5))
    budget = (after[2].epsilon + after[3].epsilon) / 2  # rounds 1 and 2 fit, round 3 does not
    account = CentralAccount(noise_multiplier=1.0, delta=1e-5, accountant="rdp", budget=budget)
    for number in (1, 2):
        assert account.check_next(round_number=number, rate=0.5) <= budget
        account = account.charged(0.5)
    with pytest.raises(CentralBudgetExhausted) as err:
        account.check_next(round_number=3, rate=0.5)
    message = str(err.value)
    assert f"round 3 would bring user-level ε to {after[3].epsilon:.6g} > dp-central-epsilon {budget:.6g}" in message
    assert f"spent {after[2].epsilon:.6g} over 2 rounds" in message
    assert account.epsilon <= budget  # nothing was charged by the refusal


def test_the_account_survives_its_checkpoint_form_and_an_old_checkpoint_is_over_counted():
    import json

    from privacy.accounting import CentralAccount

    fresh = CentralAccount(noise_multiplier=0.8, delta=1e-5, accountant="rdp")
    spent = fresh.charged(0.25).charged(0.25).charged(0.5)
    saved = json.loads(json.dumps(spent.to_json()))  # the checkpoint header is JSON
    resumed = fresh.restored(saved, rounds=3)
    assert resumed.history == spent.history and resumed.epsilon == spent.epsilon
    assert resumed.charged(0.5).epsilon == spent.charged(0.5).epsilon  # continues, does not restart
    legacy = fresh.restored({}, rounds=3)  # written before central DP was accounted: q = 1, an upper bound
    assert legacy.rounds == 3 and legacy.epsilon > spent.epsilon
    assert fresh.restored(None, rounds=0).epsilon == 0.0
    with pytest.raises(ValueError, match="'prv'"):
        fresh.restored({"accountant": "prv", "history": []}, rounds=0)
    with pytest.raises(ValueError, match="sample rate"):
        fresh.restored({"accountant": "rdp", "history": [[0.8, 2.0, 1]]}, rounds=1)


def test_the_central_budget_is_read_and_checked_with_the_other_dp_keys():
    from core.config import RunConfig
    from privacy.settings import central_account, check_node_config, parse_run_config

    def flower(**kwargs):
        return RunConfig(aggregator="fedavg", **kwargs).to_flower()

    assert central_account(flower()) is None
    assert central_account(flower(dp_central_clip=1.0)) is None  # clipping only: no noise, nothing to account
    account = central_account(flower(dp_central_clip=1.0, dp_central_noise=1.2, dp_central_epsilon=4.0,
                                     dp_delta=1e-6, dp_accountant="rdp"))
    assert (account.noise_multiplier, account.budget, account.delta, account.accountant) == (1.2, 4.0, 1e-6, "rdp")
    with pytest.raises(ValueError, match="dp-central-epsilon 4.0 needs dp-central-noise > 0"):
        parse_run_config(flower(dp_central_clip=1.0, dp_central_epsilon=4.0))
    with pytest.raises(ValueError, match="dp-central-epsilon must be a finite number >= 0"):
        parse_run_config(flower(dp_central_clip=1.0, dp_central_noise=1.0, dp_central_epsilon=-1.0))
    with pytest.raises(ValueError, match="dp-delta"):
        parse_run_config(flower(dp_central_clip=1.0, dp_central_noise=1.0, dp_delta=1.5))
    with pytest.raises(ValueError, match="may not set 'dp-central-epsilon'"):
        check_node_config({"dp-central-epsilon": 10})

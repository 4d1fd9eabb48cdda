import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation import ClientInfo, create
from aggregation.diagnostics import relative_error
from aggregation.linalg import dense
from tests.aggregation.harness import MODULES, ideal, random_updates, spec


def _aggregate(updates, max_rank=8):
    agg = create("fedavg")
    state = agg.init_state(spec(max_rank))
    return agg, state, agg.aggregate(state, updates)


def test_identical_clients_is_identity():
    (u,) = random_updates(0, [8], alphas=[16.0])
    clones = [u, *[type(u)(**{**u.__dict__, "node_id": f"c{i}"}) for i in range(3)]]
    agg, _, result = _aggregate(clones)
    for name in MODULES:
        down = agg.downlink(result.state, ClientInfo(node_id="x", rank=8, alpha=16.0))
        np.testing.assert_allclose(down.adapter[name]["A"], u.tensors[name]["A"])
        np.testing.assert_allclose(down.adapter[name]["B"], u.tensors[name]["B"])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 5))
def test_error_equals_weighted_covariance_for_equal_ranks(seed, n):
    updates = random_updates(seed, [6] * n, alphas=[12.0] * n)
    agg, state, result = _aggregate(updates, max_rank=6)
    p = np.array([u.num_examples for u in updates], float)
    p /= p.sum()
    for name in MODULES:
        s = updates[0].scale
        bs = [s * u.tensors[name]["B"] for u in updates]
        as_ = [u.tensors[name]["A"] for u in updates]
        b_bar = sum(pk * b for pk, b in zip(p, bs))
        a_bar = sum(pk * a for pk, a in zip(p, as_))
        covariance = sum(pk * (b - b_bar) @ (a - a_bar) for pk, b, a in zip(p, bs, as_))
        applied = dense(agg.global_delta(result.state)[name])
        np.testing.assert_allclose(ideal(updates, name) - applied, covariance, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), ranks=st.lists(st.integers(1, 8), min_size=2, max_size=5))
def test_exact_when_all_a_are_equal(seed, ranks):
    rng = np.random.default_rng(seed)
    shared = {name: rng.normal(size=(8, s.d_in)) for name, s in MODULES.items()}
    ranks = [8] * len(ranks)  # equal A needs equal rank to be "equal"
    updates = random_updates(seed, ranks, a_shared=shared)
    agg, state, result = _aggregate(updates)
    for name in MODULES:
        np.testing.assert_allclose(
            dense(agg.global_delta(result.state)[name]), ideal(updates, name), atol=1e-9
        )
    assert relative_error(agg, state, result, updates) < 1e-9


def test_components_one_client_holds_take_its_value_not_a_shrunk_one():
    """Ranks 2 and 8: components 2..7 are averaged over their one holder (weight 1).

    The zero-padded mean gave p_hi * value, shrinking them by the weight of the
    rank-2 client that does not have them.
    """
    updates = random_updates(3, [2, 8], alphas=[4.0, 16.0])
    agg, _, result = _aggregate(updates)
    p = np.array([u.num_examples for u in updates], float)
    p /= p.sum()
    for name in MODULES:
        g = result.state.factors[name]
        lo, hi = updates
        np.testing.assert_allclose(g["A"][2:], hi.tensors[name]["A"][2:], rtol=1e-14)
        np.testing.assert_allclose(g["B"][:, 2:], hi.scale * hi.tensors[name]["B"][:, 2:], rtol=1e-14)
        # components both hold: the plain weighted mean
        np.testing.assert_allclose(
            g["A"][:2], p[0] * lo.tensors[name]["A"] + p[1] * hi.tensors[name]["A"][:2]
        )


def test_unequal_scaling_is_folded_before_averaging():
    """Same B @ A product reached with different (rank-equal) alphas averages to it."""
    rng = np.random.default_rng(1)
    (u1,) = random_updates(1, [4], alphas=[4.0])
    u2 = type(u1)(
        node_id="n2", num_examples=u1.num_examples, rank=4, alpha=16.0,
        tensors={k: {"A": v["A"], "B": v["B"] / 4.0} for k, v in u1.tensors.items()},
    )
    agg, _, result = _aggregate([u1, u2], max_rank=4)
    for name in MODULES:
        np.testing.assert_allclose(
            dense(agg.global_delta(result.state)[name]), ideal([u1, u2], name), atol=1e-9
        )
    del rng


def test_downlink_unfolds_for_the_receiving_client():
    updates = random_updates(5, [4, 4])
    agg, _, result = _aggregate(updates, max_rank=4)
    client = ClientInfo(node_id="z", rank=2, alpha=6.0)
    down = agg.downlink(result.state, client)
    for name in MODULES:
        g = agg.global_delta(result.state)[name]
        np.testing.assert_allclose(client.scale * down.adapter[name]["B"], g["B"][:, :2])
        assert down.adapter[name]["A"].shape == (2, MODULES[name].d_in)

import copy

import numpy as np
import pytest

from core.data import load_examples
from core.presets import load_base
from server.app import make_aggregator
from server.calibration import lora_sb_calibration
from core.config import RunConfig


@pytest.fixture(scope="module")
def base():
    return load_base("tiny")


def test_full_rank_init_reconstructs_the_sign_step(base):
    """At full rank, B R A is exactly -lr * sign(summed gradient): entries are +-lr."""
    lr = 0.01
    init = lora_sb_calibration(
        copy.deepcopy(base.model), base.tokenizer, load_examples("chatterbot")[:32], targets=("q_proj",),
        rank=32, learning_rate=lr, num_batches=2, batch_size=8, max_len=48, seed=0,
    )
    assert len(init) == 2  # one q_proj per layer
    for factors in init.values():
        dense = factors["B"] @ factors["R"] @ factors["A"]
        np.testing.assert_allclose(np.abs(dense), lr, rtol=1e-6)
        b = factors["B"]
        np.testing.assert_allclose(b.T @ b, np.eye(b.shape[1]), atol=1e-8)


def test_calibration_leaves_the_model_untouched(base):
    model = copy.deepcopy(base.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora_sb_calibration(model, base.tokenizer, load_examples("chatterbot")[:16], targets=("v_proj",), rank=4,
                        learning_rate=0.01, num_batches=1, batch_size=8, max_len=32, seed=0)
    for k, v in model.state_dict().items():
        assert (v == before[k]).all(), k
    assert not any(p.requires_grad for p in model.parameters())


def test_fed_sb_uses_the_calibration_init(base):
    cfg = RunConfig(aggregator="fed-sb", model="tiny", max_rank=4, ranks="2,4", calibration_data="chatterbot", calibration_batches=1)
    agg = make_aggregator(cfg, base)
    from server.app import model_spec

    state = agg.init_state(model_spec(cfg, base.model))
    delta = agg.global_delta(state)
    assert any(np.abs(f["B"] @ f["A"]).max() > 0 for f in delta.values())  # random init would start at zero


def test_aggregator_options_are_parsed_and_bad_ones_named(base):
    assert RunConfig(aggregator_options="solver=paper, ridge=0.1").aggregator_kwargs == {"solver": "paper", "ridge": 0.1}
    with pytest.raises(ValueError, match="'ridge'"):
        RunConfig(aggregator_options="ridge")
    with pytest.raises(ValueError, match="bogus"):
        make_aggregator(RunConfig(aggregator="fedavg", aggregator_options="bogus=1"), base)
    with pytest.raises(ValueError, match="only used by fed-sb"):
        make_aggregator(RunConfig(aggregator="fedavg", calibration_data="chatterbot"), base)

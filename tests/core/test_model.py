"""Adapters on the tiny model: factor I/O, B·R·A math, base-update folding, training."""

import copy

import numpy as np
import pytest
import torch

from core.data import load_examples
from core.model import AdaptedModel, AdapterSpec, fold_into_base, module_shapes
from core.presets import load_base
from core.trainer import TrainConfig, evaluate, train

TARGETS = ("q_proj", "v_proj")


@pytest.fixture(scope="module")
def base():
    return load_base("tiny")


def _random_factors(shapes, rank, keys, seed):
    rng = np.random.default_rng(seed)
    table = lambda s: {"A": (rank, s.d_in), "B": (s.d_out, rank), "R": (rank, rank)}  # noqa: E731
    return {m: {k: rng.normal(size=table(s)[k]).astype(np.float32) for k in keys} for m, s in shapes.items()}


def test_tiny_model_is_identical_across_loads(base):
    again = load_base("tiny")
    for p, q in zip(base.model.parameters(), again.model.parameters()):
        assert torch.equal(p, q)


def test_lora_load_then_export_round_trips(base):
    shapes = module_shapes(base.model, TARGETS)
    adapted = AdaptedModel(copy.deepcopy(base.model), AdapterSpec(kind="lora", rank=4, alpha=8.0, targets=TARGETS))
    factors = _random_factors(shapes, 4, "AB", seed=0)
    adapted.load(factors)
    out = adapted.export("AB")
    for m in factors:
        np.testing.assert_array_equal(out[m]["A"], factors[m]["A"])


def test_lora_rejects_wrong_rank_payload(base):
    shapes = module_shapes(base.model, TARGETS)
    adapted = AdaptedModel(copy.deepcopy(base.model), AdapterSpec(kind="lora", rank=4, alpha=8.0, targets=TARGETS))
    with pytest.raises(ValueError, match="rank-4"):
        adapted.load(_random_factors(shapes, 8, "AB", seed=0))


@pytest.mark.parametrize("kind, keys", [("lora", "AB"), ("bra", "ABR")])
def test_adapter_output_equals_base_plus_scaled_product(base, kind, keys):
    """The adapted model equals the base model with s·B(R)A folded into W."""
    shapes = module_shapes(base.model, TARGETS)
    spec = AdapterSpec(kind=kind, rank=3, alpha=6.0, targets=TARGETS)
    factors = _random_factors(shapes, 3, keys, seed=1)
    adapted = AdaptedModel(copy.deepcopy(base.model), spec)
    adapted.load(factors)
    merged = copy.deepcopy(base.model)
    folded = {}
    for m, f in factors.items():
        middle = f["R"] if "R" in f else np.eye(3, dtype=np.float32)
        folded[m] = {"B": spec.scale * f["B"] @ middle, "A": f["A"]}
    fold_into_base(merged, [folded])
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        torch.testing.assert_close(adapted.model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_bra_trains_only_r(base):
    adapted = AdaptedModel(copy.deepcopy(base.model), AdapterSpec(kind="bra", rank=2, alpha=2.0, targets=TARGETS))
    adapted.set_trainable(frozenset({"R"}))
    trainable = [n for n, p in adapted.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("lora_R.weight") for n in trainable)


def test_folding_missed_rounds_gives_bitwise_equal_weights(base):
    """A node that folds rounds 1..3 at once equals one that folded them one by one."""
    shapes = module_shapes(base.model, TARGETS)
    log = [_random_factors(shapes, 2, "AB", seed=s) for s in range(3)]
    every_round = copy.deepcopy(base.model)
    for update in log:
        fold_into_base(every_round, [update])
    late = copy.deepcopy(base.model)
    fold_into_base(late, log)
    for (n, p), q in zip(every_round.named_parameters(), late.parameters()):
        assert torch.equal(p, q), n


def test_training_lowers_the_loss_on_its_own_batch(base):
    examples = load_examples("chatterbot")[:16]
    adapted = AdaptedModel(copy.deepcopy(base.model), AdapterSpec(kind="lora", rank=8, alpha=16.0, targets=TARGETS))
    adapted.set_trainable(frozenset({"A", "B"}))
    before = evaluate(adapted.model, examples, base.tokenizer, max_len=64).loss
    torch.manual_seed(0)
    result = train(adapted, examples, base.tokenizer, TrainConfig(steps=15, batch_size=16, learning_rate=0.05, max_len=64, seed=0))
    after = evaluate(adapted.model, examples, base.tokenizer, max_len=64).loss
    assert np.isfinite(result.mean_loss)
    assert after < before - 0.05, (before, after)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_training_step_with_bf16_autocast_exports_fp32(base):
    examples = load_examples("chatterbot")[:8]
    adapted = AdaptedModel(copy.deepcopy(base.model), AdapterSpec(kind="lora", rank=4, alpha=8.0, targets=TARGETS))
    adapted.set_trainable(frozenset({"A", "B"}))
    before = adapted.export("AB")
    train(adapted, examples, base.tokenizer, TrainConfig(steps=2, batch_size=4, learning_rate=0.01, max_len=64, seed=0))
    assert next(adapted.model.parameters()).is_cuda
    after = adapted.export("AB")
    m = next(iter(after))
    assert after[m]["A"].dtype == np.float32 and not np.array_equal(after[m]["A"], before[m]["A"])


def test_no_answer_token_within_max_len_is_an_error_not_a_perfect_score():
    # at a max-len the prompt and chat template fill, every loss is over nothing: perplexity
    # 1.0 would read as a perfect model, an update as real training
    from core.data import load_examples
    from core.model import AdaptedModel, AdapterSpec
    from core.presets import load_base
    from core.trainer import TrainConfig, evaluate, train

    base = load_base("tiny")
    examples = load_examples("chatterbot")[:4]
    with pytest.raises(ValueError, match="no answer token left in the 4 examples evaluated at max-seq-len 3"):
        evaluate(base.model, examples, base.tokenizer, max_len=3)
    adapted = AdaptedModel(copy.deepcopy(base.model), AdapterSpec(kind="lora", rank=2, alpha=16.0,
                                                                  targets=("q_proj", "v_proj")))
    adapted.set_trainable(frozenset({"A", "B"}))
    with pytest.raises(ValueError, match="trained on at max-seq-len 3"):
        train(adapted, examples, base.tokenizer, TrainConfig(steps=1, batch_size=2, learning_rate=1e-3, max_len=3,
                                                             seed=0))
    assert evaluate(base.model, examples, base.tokenizer, max_len=256).tokens > 0

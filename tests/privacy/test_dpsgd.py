"""DP-SGD through Opacus on the tiny model: exactness, clipping, no-op guards, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from core.data import collate
from core.trainer import TrainConfig, batches, sequence_loss, sequence_losses, train
from privacy.accounting import History, check_history, compose
from privacy.dpsgd import DPSGDConfig, OpacusDPSGD, poisson_sample_rate
from privacy.opacus_support import GRAD_SAMPLE_MODES, DPIncompatibleError, check_dp_compatible
from tests.privacy.helpers import adapted, examples, tiny, trainable_vector

MAX_LEN = 48


def _cfg(steps: int, batch_size: int, lr: float = 1e-3) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=batch_size, learning_rate=lr, max_len=MAX_LEN, seed=0)


def _hook(*, steps: int = 1, sample_rate: float = 1.0, noise: float = 0.0, clip: float = 1e10,
          mode: str = "hooks", reserved: list | None = None) -> OpacusDPSGD:
    config = DPSGDConfig(noise_multiplier=noise, max_grad_norm=clip, sample_rate=sample_rate, steps=steps,
                         grad_sample_mode=mode, noise_seed=0, sampling_seed=0)
    return OpacusDPSGD(config=config, on_reserve=None if reserved is None else reserved.append)


def test_plain_path_is_bit_identical_to_the_reference_loop():
    """train() without a hook must be exactly the loop it was before DP existed."""
    data, cfg = examples(12), _cfg(steps=3, batch_size=4)
    ours, ref = adapted("lora", seed=1), adapted("lora", seed=1)
    train(ours, data, tiny().tokenizer, cfg)
    model = ref.model.train()
    optimizer = torch.optim.AdamW(ref.trainable_parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    for chunk in batches(data, cfg):
        loss = sequence_loss(model, collate(chunk, tiny().tokenizer, cfg.max_len))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert torch.equal(trainable_vector(ours), trainable_vector(ref))


@pytest.mark.parametrize("kind", ["lora", "bra"])
def test_zero_noise_and_infinite_clip_equal_plain_training(kind):
    # N = batch size: Poisson sampling at rate 1 takes every example, as a plain batch does
    data, cfg = examples(4), _cfg(steps=2, batch_size=4)
    plain, private = adapted(kind, seed=2), adapted(kind, seed=2)
    start = trainable_vector(plain)
    train(plain, data, tiny().tokenizer, cfg)
    result = train(private, data, tiny().tokenizer, cfg, privacy=_hook(steps=2, noise=0.0, clip=1e10))
    assert result.steps == 2
    assert not torch.equal(trainable_vector(plain), start)
    torch.testing.assert_close(trainable_vector(private), trainable_vector(plain), rtol=1e-4, atol=1e-6)


def _brute_force_clipped_mean(adapter, data, clip: float) -> torch.Tensor:
    """Mean over examples of each example's own gradient, clipped as Opacus does."""
    model = adapter.model.train()
    params = adapter.trainable_parameters()
    clipped = []
    for example in data:
        for p in params:
            p.grad = None
        loss = sequence_losses(model, collate([example], tiny().tokenizer, MAX_LEN))[0]
        loss.backward()
        grad = torch.cat([p.grad.reshape(-1) for p in params])
        clipped.append(grad * min(1.0, clip / (float(grad.norm()) + 1e-6)))
    for p in params:
        p.grad = None
    return torch.stack(clipped).mean(0)


@pytest.mark.parametrize("mode", sorted(GRAD_SAMPLE_MODES))
@pytest.mark.parametrize("kind", ["lora", "bra"])
def test_zero_noise_applies_the_mean_of_per_example_clipped_gradients(kind, mode):
    data = examples(4, offset=20)
    adapter = adapted(kind, seed=3)
    per_example_norms = []
    expected_unclipped = _brute_force_clipped_mean(adapter, data, clip=1e10)
    for example in data:  # a clip well below every example's norm, so all are clipped
        g = _brute_force_clipped_mean(adapter, [example], clip=1e10)
        per_example_norms.append(float(g.norm()))
    clip = 0.25 * min(per_example_norms)
    expected = _brute_force_clipped_mean(adapter, data, clip=clip)
    assert not torch.allclose(expected, expected_unclipped)

    before = trainable_vector(adapter)
    model = adapter.model.train()
    sgd = torch.optim.SGD(adapter.trainable_parameters(), lr=1.0)  # applied gradient = -Δw
    session = _hook(noise=0.0, clip=clip, mode=mode).attach(
        model=model, optimizer=sgd, examples=data, tokenizer=tiny().tokenizer, cfg=_cfg(1, 4, lr=1.0))
    (batch,) = list(session.batches())
    assert batch["input_ids"].shape[0] == 4
    session.step(sequence_losses(model, batch))
    session.close()
    applied = before - trainable_vector(adapter)
    torch.testing.assert_close(applied, expected, rtol=1e-3, atol=1e-7)
    assert float(applied.norm()) <= clip * (1 + 1e-4)  # a mean of vectors of norm <= clip


@pytest.mark.parametrize("kind", ["lora", "bra"])
def test_one_dp_step_changes_the_adapter_and_leaves_a_clean_model(kind):
    adapter = adapted(kind, seed=4)
    frozen = {n: p.detach().clone() for n, p in adapter.model.named_parameters() if not p.requires_grad}
    before = trainable_vector(adapter)
    hook = _hook(noise=1.0, clip=1.0, sample_rate=0.5)
    result = train(adapter, examples(8), tiny().tokenizer, _cfg(1, 4), privacy=hook)
    assert result.steps == 1
    after = trainable_vector(adapter)
    assert torch.isfinite(after).all() and not torch.equal(after, before)
    assert all(torch.equal(p, frozen[n]) for n, p in adapter.model.named_parameters() if n in frozen)
    # Opacus's hooks and per-sample attributes are gone; the PEFT model still runs
    model = adapter.model
    assert not hasattr(model, "autograd_grad_sample_hooks")
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    with torch.no_grad():
        batch = collate(examples(2), tiny().tokenizer, MAX_LEN)
        assert torch.isfinite(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits).all()
    assert hook.history == ((1.0, 0.5, 1),)


def _seed_with_empty_first_batch(n: int, rate: float) -> int:
    for seed in range(10_000):  # Opacus's sampler: one torch.rand(n) mask per batch
        generator = torch.Generator().manual_seed(seed)
        if not (torch.rand(n, generator=generator) < rate).any():
            return seed
    raise AssertionError("no seed found")


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_an_empty_first_poisson_batch_is_a_noise_only_step_and_accounted(mode):
    data = examples(40)  # batch size 1: sample rate 1/40, the first batch is often empty
    rate = 1 / 40
    config = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=rate, steps=3,
                         grad_sample_mode=mode, noise_seed=0, sampling_seed=_seed_with_empty_first_batch(40, rate))
    hook = OpacusDPSGD(config=config)
    adapter = adapted("lora", seed=5)
    before = trainable_vector(adapter)
    result = train(adapter, data, tiny().tokenizer, _cfg(3, 1), privacy=hook)
    assert hook.empty_steps >= 1 and result.steps == 3
    assert hook.history == ((1.0, rate, 3),)  # every step accounted, the empty ones too
    assert not torch.equal(trainable_vector(adapter), before)  # noise moved the adapter


def test_the_round_is_reserved_before_the_first_step():
    reserved: list = []
    hook = _hook(steps=2, noise=1.0, clip=1.0, sample_rate=0.5, reserved=reserved)
    train(adapted("lora"), examples(8), tiny().tokenizer, _cfg(2, 4), privacy=hook)
    assert reserved == [((1.0, 0.5, 2),)]


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda: adapted("lora", use_dora=True), "DoRA"),
        (lambda: adapted("lora", targets=("q_proj", "v_proj", "embed_tokens")), "embedding"),
    ],
)
def test_dora_and_embedding_lora_are_refused_before_training(make, needle):
    adapter = make()
    offending = [n for n, p in adapter.model.named_parameters()
                 if p.requires_grad and ("lora_magnitude_vector" in n or "lora_embedding" in n)]
    assert offending  # PEFT trains them by default
    before = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    reserved: list = []
    with pytest.raises(DPIncompatibleError, match=needle):
        train(adapter, examples(8), tiny().tokenizer, _cfg(1, 4),
              privacy=_hook(noise=1.0, clip=1.0, sample_rate=0.5, reserved=reserved))
    assert reserved == []  # nothing was spent
    assert all(torch.equal(p, before[n]) for n, p in adapter.model.named_parameters())
    with pytest.raises(DPIncompatibleError, match=needle):
        check_dp_compatible(adapter.model)


def test_plan_and_trainer_must_agree():
    with pytest.raises(ValueError, match="sample rate"):
        train(adapted("lora"), examples(8), tiny().tokenizer, _cfg(1, 4), privacy=_hook(sample_rate=0.25))
    with pytest.raises(ValueError, match="steps"):
        train(adapted("lora"), examples(8), tiny().tokenizer, _cfg(2, 4), privacy=_hook(steps=1, sample_rate=0.5))


def test_dp_sgd_config_names_bad_values():
    for kwargs, needle in [
        ({"noise_multiplier": -1.0}, "-1.0"),
        ({"max_grad_norm": float("inf")}, "inf"),
        ({"sample_rate": 0.0}, "sample rate"),
        ({"steps": 0}, "steps"),
        ({"grad_sample_mode": "ew"}, "'ew'"),
        ({"accountant": "gdp"}, "'gdp'"),
    ]:
        base = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "sample_rate": 0.5, "steps": 1}
        with pytest.raises(ValueError, match=needle):
            DPSGDConfig(**{**base, **kwargs})
    assert np.isclose(DPSGDConfig(**base).history_after[0][1], 0.5)


# --- the plan's sample rate is the one Opacus accounts ------------------------------------------


def _opacus_accounts(num_examples: int, batch_size: int, steps: int) -> History:
    """What Opacus itself records: make_private on a plain loader of this size, then steps."""
    from opacus import PrivacyEngine

    model = nn.Linear(1, 1)
    engine = PrivacyEngine(accountant="rdp")
    loader = DataLoader(TensorDataset(torch.zeros(num_examples, 1)), batch_size=batch_size)
    hooks, optimizer, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True, wrap_model=False)
    for _ in range(steps):  # noise-only steps: the accountant's hook runs all the same
        for param in optimizer.params:
            param.grad_sample = torch.zeros((0, *param.shape))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    hooks.cleanup()
    return check_history(engine.accountant.history)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_planned_sample_rate_and_steps_are_what_opacus_accounts_for_every_n_to_2000():
    """int(1 / (1 / m)) is m - 1 for some m (93, 99, ...): planning 1 / ceil(n / b) failed there."""
    for batch_size in (1, 2, 7):
        for n in range(1, 2001):
            planned = compose((), 1.0, poisson_sample_rate(n, batch_size), 2)
            assert planned == _opacus_accounts(n, batch_size, 2), (n, batch_size)


def test_a_round_at_a_float_unlucky_dataset_size_commits_and_samples_at_the_accounted_rate():
    # 185 examples at batch size 2: 93 batches, where Opacus accounts 1/92 (the 829 is 415 -> 414)
    data, batch_size = examples(185), 2
    rate = poisson_sample_rate(len(data), batch_size)
    assert rate == 1 / 92
    config = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=rate, steps=2,
                         noise_seed=0, sampling_seed=0)

    probe, adapter = OpacusDPSGD(config=config), adapted("lora", seed=6)
    session = probe.attach(model=adapter.model.train(), optimizer=torch.optim.SGD(adapter.trainable_parameters()),
                           examples=data, tokenizer=tiny().tokenizer, cfg=_cfg(2, batch_size))
    sampler = session.loader.batch_sampler
    session.close()
    assert sampler.sample_rate == rate and len(sampler) == 2  # sampled as accounted, for the planned steps

    reserved: list = []
    hook = OpacusDPSGD(config=config, on_reserve=reserved.append)
    train(adapted("lora", seed=6), data, tiny().tokenizer, _cfg(2, batch_size), privacy=hook)
    assert hook.history == reserved[-1] == ((1.0, 1 / 92, 2),)

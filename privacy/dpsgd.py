"""DP-SGD for one round of local training, through Opacus's ``PrivacyEngine``.

``OpacusDPSGD`` is the privacy hook ``core.trainer.train`` accepts. ``attach`` is
called after the model is on its device, wrapped with adapters and given its
optimizer; it checks the trainable layers, then calls ``make_private`` with the noise
multiplier the run fixed once (never ``make_private_with_epsilon``: that calibrates
as if nothing had been spent, so calling it every round would grant a fresh budget
every round) and with the node's prior history loaded into the engine's accountant.

Choices, and why:

* ``wrap_model=False`` with per-sample-gradient hooks: Opacus attaches its hooks to
  the PEFT model itself instead of wrapping it in a ``GradSampleModule``, so the
  model keeps working as a PEFT / transformers model (keyword forward, attribute
  access) and is clean again after ``cleanup()``.
* Poisson sampling (Opacus's ``UniformWithReplacementSampler``) at exactly the rate
  ``make_private`` hands its accountant, for exactly the planned steps; the plan's rate
  comes from the same Opacus loader (``poisson_sample_rate``). Batches vary in size and
  may be empty. A transformers model cannot run on zero rows, and skipping the step
  would leave a step that the accountant does not count, so an empty batch becomes a
  noise-only step: zero-row per-sample gradients, then the optimizer's usual clip (of
  nothing), noise and accounting.
* The collate function is primed once with one example: Opacus's empty-batch
  collate learns the batch structure (our dict of tensors) from the first non-empty
  batch and otherwise crashes when the very first Poisson batch is empty.
* The loss is per sequence (``core.trainer.sequence_losses``): Hugging Face's
  ``labels=`` loss divides by the batch's token count, which couples the examples of
  a batch and breaks per-example clipping.
* Noise and sampling randomness come from the OS unless a test pins a seed: a seed
  derived from the run config would let the server, which knows the config,
  regenerate the noise and subtract it.

What Opacus can train here, and the grad-sample modes: ``privacy.opacus_support``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import secrets
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from core.data import collate
from privacy.accounting import History, check_accountant, check_history, compose
from privacy.opacus_support import (
    GRAD_SAMPLE_MODES, GhostClipping, PerSampleGradients, PerSequenceCriterion, check_dp_compatible,
    check_grad_sample_mode,
)


def poisson_sample_rate(num_examples: int, batch_size: int) -> float:
    """The sample rate Opacus's ``make_private`` accounts for this many examples at this batch size.

    ``make_private`` wraps the loader in a ``DPDataLoader`` sampling at ``1 / len(loader)``
    = 1 / ceil(n / b), and hands its accountant ``1 / len(DPDataLoader)``, whose length is
    ``int(1 / rate)``. In floating point ``int(1 / (1 / m))`` is m - 1 for some m (93, 99,
    105, ...), so the accounted rate is not 1 / ceil(n / b) there. The rate is therefore
    taken from Opacus's own loader, built exactly as ``OpacusDPSGD.attach`` builds it.
    """
    if num_examples < 1 or batch_size < 1:
        raise ValueError(f"need examples and batch size >= 1, got {num_examples} and {batch_size}")
    from opacus.data_loader import DPDataLoader

    return _accounted_rate(DPDataLoader.from_data_loader(_index_loader(num_examples, batch_size)))


def _accounted_rate(dp_loader: DataLoader) -> float:
    """What ``make_private`` passes its accountant's step hook for this Poisson loader."""
    return 1.0 / len(dp_loader)


# --- one round ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DPSGDConfig:
    """Everything one round of DP-SGD needs; the noise multiplier is fixed by the caller."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    accountant: str = "prv"
    grad_sample_mode: str = "hooks"
    history: History = ()  # the node's history before this round
    noise_seed: int | None = None  # None: OS randomness (see the module docstring)
    sampling_seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"noise multiplier must be finite and >= 0, got {self.noise_multiplier}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max grad norm must be finite and > 0, got {self.max_grad_norm}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 1:
            raise ValueError(f"DP-SGD steps must be >= 1, got {self.steps}")
        check_accountant(self.accountant)
        check_grad_sample_mode(self.grad_sample_mode)
        object.__setattr__(self, "history", check_history(self.history))

    @property
    def history_after(self) -> History:
        """The history once all of this round's steps are taken (what is reserved up front)."""
        return compose(self.history, self.noise_multiplier, self.sample_rate, self.steps)


class _Indices(Dataset):
    """Item i is ``(i,)``: Opacus's DPDataLoader inspects ``dataset[0]`` as a tuple."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[int]:
        return (index,)


def _index_loader(num_examples: int, batch_size: int, **kwargs: Any) -> DataLoader:
    """The loader handed to ``make_private``; the plan's rate is derived from the same one."""
    return DataLoader(_Indices(num_examples), batch_size=batch_size, **kwargs)


def _collate(items: list[tuple[int]], *, examples: Sequence[Any], tokenizer: Any, max_len: int) -> dict:
    return collate([examples[i] for (i,) in items], tokenizer, max_len)


@contextlib.contextmanager
def _expected_warnings() -> Iterator[None]:
    """Silence the warnings Opacus raises on every PEFT model, and only those."""
    with warnings.catch_warnings():
        # our noise generator is seeded from the OS (see above); Opacus's secure mode
        # needs torchcsprng, which has no current wheels
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        # the adapter's input (a frozen layer's activation) needs no gradient; the hook
        # only wants the gradient w.r.t. the adapter's output, which it gets
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


def _generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63) if seed is None else seed)
    return generator


class OpacusDPSGD:
    """The trainer's privacy hook: one round of DP-SGD with Opacus.

    ``on_reserve(history)`` is called before the first step with the history as it
    will be after every planned step (persist it: a crash mid-round then over-counts,
    never under-counts); ``on_commit(history)`` after the last step with the
    accountant's own history, which must equal the reservation.
    """

    def __init__(
        self,
        *,
        config: DPSGDConfig,
        on_reserve: Callable[[History], None] | None = None,
        on_commit: Callable[[History], None] | None = None,
    ) -> None:
        self.config = config
        self.on_reserve = on_reserve
        self.on_commit = on_commit
        self.history: History | None = None  # the accountant's history after a completed round
        self.empty_steps = 0

    def attach(self, *, model: nn.Module, optimizer: torch.optim.Optimizer, examples: Sequence[Any],
               tokenizer: Any, cfg: Any) -> _Session:
        from opacus import PrivacyEngine
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        cfg_steps, batch_size, max_len = int(cfg.steps), int(cfg.batch_size), int(cfg.max_len)
        if cfg_steps != self.config.steps:
            raise ValueError(f"trainer asks for {cfg_steps} steps but the DP plan is for {self.config.steps}")
        check_dp_compatible(model)
        expected = poisson_sample_rate(len(examples), batch_size)
        if expected != self.config.sample_rate:
            raise ValueError(
                f"DP plan sample rate {self.config.sample_rate} does not match {len(examples)} examples "
                f"at batch size {batch_size} ({expected})"
            )
        mode = GRAD_SAMPLE_MODES[self.config.grad_sample_mode]
        device = next(p for p in model.parameters() if p.requires_grad).device
        sampling = _generator(self.config.sampling_seed)
        loader = _index_loader(
            len(examples), batch_size,
            collate_fn=functools.partial(_collate, examples=examples, tokenizer=tokenizer, max_len=max_len),
            generator=sampling,
        )
        with _expected_warnings():
            engine = PrivacyEngine(accountant=self.config.accountant)
            if self.config.history:
                engine.accountant.load_state_dict(
                    {"history": list(self.config.history), "mechanism": engine.accountant.mechanism()}
                )
            made = engine.make_private(
                module=model,
                optimizer=optimizer,
                criterion=PerSequenceCriterion(),
                data_loader=loader,
                noise_multiplier=self.config.noise_multiplier,
                max_grad_norm=self.config.max_grad_norm,
                poisson_sampling=True,
                grad_sample_mode=mode.opacus_mode,
                wrap_model=False,
                noise_generator=_generator(self.config.noise_seed, device),
            )
        if mode.ghost:
            hooks, dp_optimizer, criterion, dp_loader = made
        else:
            (hooks, dp_optimizer, dp_loader), criterion = made, None
        accounted = _accounted_rate(dp_loader)
        if accounted != self.config.sample_rate:
            hooks.cleanup()
            raise RuntimeError(f"Opacus accounts a sample rate of {accounted}, the plan {self.config.sample_rate}")
        # Opacus's loader samples at 1 / ceil(n / b), which can be below the rate its accountant
        # steps at (see poisson_sample_rate). Sample with Opacus's own Poisson sampler at exactly
        # the accounted rate, for exactly the planned steps, so that what is sampled, what is
        # accounted and what was reserved are one figure. Same generator, same collate.
        batches = DataLoader(
            dp_loader.dataset,
            batch_sampler=UniformWithReplacementSampler(
                num_samples=len(examples), sample_rate=accounted, generator=sampling, steps=self.config.steps,
            ),
            collate_fn=dp_loader.collate_fn,
            generator=sampling,
        )
        batches.collate_fn([(0,)])  # prime the empty-batch collate with one example's structure
        if self.on_reserve is not None:
            self.on_reserve(self.config.history_after)
        return _Session(hook=self, engine=engine, hooks=hooks, optimizer=dp_optimizer, criterion=criterion,
                        loader=batches, mode=mode)


class _Session:
    """The trainer's view of one attached round (``core.trainer.PrivateSession``)."""

    def __init__(self, *, hook: OpacusDPSGD, engine: Any, hooks: Any, optimizer: Any, criterion: Any,
                 loader: DataLoader, mode: PerSampleGradients | GhostClipping) -> None:
        self.hook = hook
        self.engine = engine
        self.hooks = hooks
        self.optimizer = optimizer
        self.criterion = criterion
        self.loader = loader
        self.mode = mode
        self.done = 0
        self.closed = False

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Exactly ``steps`` Poisson batches (possibly empty): the sampler is built for that many."""
        return iter(self.loader)

    def step(self, per_sequence: torch.Tensor) -> None:
        with _expected_warnings():
            self.mode.backward(per_sequence, self.criterion)
        self._apply()

    def empty_step(self) -> None:
        """No example was sampled: clip nothing, add noise, account the step."""
        self.mode.prepare_noise_only(self.optimizer)
        self.hook.empty_steps += 1
        self._apply()

    def _apply(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.done += 1

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.hooks.cleanup()  # the PEFT model is a plain model again (no hooks, no grad_sample)
        if self.done != self.hook.config.steps:
            return  # interrupted: the reservation (all planned steps) stays on record
        history = check_history(self.engine.accountant.history)
        if history != self.hook.config.history_after:
            raise RuntimeError(
                f"privacy accounting mismatch: the accountant recorded {history}, "
                f"the plan reserved {self.hook.config.history_after}"
            )
        self.hook.history = history
        if self.hook.on_commit is not None:
            self.hook.on_commit(history)

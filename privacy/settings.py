"""DP settings: from the run config, overridden per node by its ``node_config``.

Keys (run config and node config alike; 0 / empty means off):

  dp-epsilon           target ε over everything this node's data is ever trained on
  dp-delta             δ of the (ε, δ) guarantee (default 1e-5)
  dp-noise-multiplier  fixed noise multiplier σ; 0: calibrate σ once per run from dp-epsilon
  dp-max-grad-norm     per-example clipping bound C
  dp-accountant        prv (reported figures, default) | rdp
  dp-on-budget         decline | truncate, when a round would pass dp-epsilon
  dp-grad-sample-mode  hooks (default) | ghost | functorch
  dp-state-dir         where the per-node privacy history lives (default .cache/privacy)

Local DP-SGD is on when dp-epsilon or dp-noise-multiplier is > 0. A node's own
``node_config`` wins over the run config, so an organisation can demand a stricter
budget than the federation's default. The central-DP keys (dp-central-clip,
dp-central-noise, and dp-central-epsilon, the user-level ε budget the server enforces
before each round) are run-wide only: the server calibrates its noise to one clip, so
a node may not change it. Any other ``dp-*`` key in a node's config, or a value that
does not parse, is refused (``check_node_config``) at ``client start`` and again by
the ClientApp, never ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import RunConfig
from privacy.accounting import CentralAccount, check_accountant
from privacy.budget import check_policy
from privacy.central import check_central_dp

DEFAULT_DELTA = 1e-5


@dataclass(frozen=True, kw_only=True)
class DPSettings:
    epsilon: float = 0.0
    delta: float = DEFAULT_DELTA
    noise_multiplier: float = 0.0
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    on_budget: str = "decline"
    grad_sample_mode: str = "hooks"
    state_dir: str = ""
    noise_seed: int | None = None  # tests only: None draws from the OS (see privacy.dpsgd)
    sampling_seed: int | None = None

    def __post_init__(self) -> None:
        for key, value in (("dp-epsilon", self.epsilon), ("dp-noise-multiplier", self.noise_multiplier)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{key} must be a finite number >= 0 (0 = off), got {value}")
        if self.enabled:  # the remaining keys only matter with DP on
            self.check_knobs()

    def check_knobs(self) -> None:
        """Validate the keys that only matter with DP on (a node checks its own up front)."""
        if not 0 < self.delta < 1:
            raise ValueError(f"dp-delta must be in (0, 1) with DP on, got {self.delta}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"dp-max-grad-norm must be a finite number > 0, got {self.max_grad_norm}")
        check_accountant(self.accountant)
        check_policy(self.on_budget)
        from privacy.opacus_support import check_grad_sample_mode  # torch: not for every CLI start (~2 s)

        check_grad_sample_mode(self.grad_sample_mode)

    @property
    def enabled(self) -> bool:
        return self.epsilon > 0 or self.noise_multiplier > 0

    @property
    def has_target(self) -> bool:
        return self.epsilon > 0

    def ledger_directory(self) -> Path:
        if self.state_dir:
            return Path(self.state_dir).expanduser()
        from core.presets import cache_dir  # the project's cache (FEDLORA_CACHE overrides)

        return cache_dir() / "privacy"


def _number(value: Any) -> float:
    if isinstance(value, bool):  # float(True) would read as 1.0
        raise TypeError("expected a number, not a boolean")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError("expected a number") from None


#: config key -> (DPSettings field, how a value is read): every dp-* key a run config
#: or a node's own node_config may set (the central-DP keys below are run-wide only)
LOCAL_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "dp-epsilon": ("epsilon", _number),
    "dp-delta": ("delta", _number),
    "dp-noise-multiplier": ("noise_multiplier", _number),
    "dp-max-grad-norm": ("max_grad_norm", _number),
    "dp-accountant": ("accountant", str),
    "dp-on-budget": ("on_budget", str),
    "dp-grad-sample-mode": ("grad_sample_mode", str),
    "dp-state-dir": ("state_dir", str),
}
CENTRAL_KEYS = ("dp-central-clip", "dp-central-noise", "dp-central-epsilon")
DP_PREFIX = "dp-"  # every DP key starts with it; other node_config keys (rank, data) are not DP's


def _read(key: str, value: Any, *, where: str) -> tuple[str, Any]:
    name, read = LOCAL_KEYS[key]
    try:
        return name, read(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where} {key}: {value!r} is not valid ({exc})") from None


def node_overrides(node_config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``DPSettings`` fields a node's own config sets, read.

    Any other ``dp-*`` key is refused, not ignored: a misspelt ``dp-epsion=2`` would
    otherwise silently drop the node's stricter budget.
    """
    values: dict[str, Any] = {}
    for key, value in node_config.items():
        if not key.startswith(DP_PREFIX):
            continue
        if key in CENTRAL_KEYS:
            raise ValueError(f"node config may not set {key!r}: central DP is calibrated run-wide")
        if key not in LOCAL_KEYS:
            raise ValueError(f"node config key {key!r} is not a DP setting; valid: {', '.join(LOCAL_KEYS)}")
        name, read_value = _read(key, value, where="node config")
        values[name] = read_value
    return values


def check_node_config(node_config: Mapping[str, Any]) -> None:
    """Validate a node's own dp-* keys before it serves any run (``client start``, the ClientApp).

    The run may switch DP on for this node, so its keys are checked as DP-on values even
    when the node itself leaves DP off.
    """
    DPSettings(**node_overrides(node_config)).check_knobs()


def local_dp(run_config: Mapping[str, Any], node_config: Mapping[str, Any] | None = None) -> DPSettings | None:
    """This node's DP-SGD settings, or None when DP-SGD is off for it.

    ``run_config`` uses Flower's hyphenated keys (``RunConfig.to_flower()`` or
    ``context.run_config``); ``node_config`` values override them.
    """
    values = dict(_read(key, run_config[key], where="run config") for key in LOCAL_KEYS if key in run_config)
    values.update(node_overrides(node_config or {}))
    settings = DPSettings(**values)
    return settings if settings.enabled else None


def parse_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """Flower's run config -> a RunConfig whose every key, dp-* included, is checked.

    Every entry point (the CLI, the ServerApp, the ClientApp) reads its run config
    through here: ``RunConfig`` checks the keys ``core`` knows the meaning of, and this
    adds the dp-* ones, which only ``privacy`` interprets.
    """
    cfg = RunConfig.from_flower(run_config)
    check_run_config(cfg.to_flower())
    return cfg


def check_run_config(run_config: Mapping[str, Any]) -> None:
    """Validate every dp-* key of a run config up front, naming the bad one."""
    local_dp(run_config)
    clip = float(run_config.get("dp-central-clip", 0.0))
    noise = float(run_config.get("dp-central-noise", 0.0))
    if not (math.isfinite(clip) and clip >= 0):
        raise ValueError(f"dp-central-clip must be a finite number >= 0 (0 = off), got {clip}")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"dp-central-noise must be a finite number >= 0, got {noise}")
    if noise > 0 and clip == 0:
        raise ValueError(f"dp-central-noise {noise} needs dp-central-clip > 0: noise is calibrated to the clip")
    if clip > 0:
        check_central_dp(str(run_config.get("aggregator", "")))
    budget = float(run_config.get("dp-central-epsilon", 0.0))
    if not (math.isfinite(budget) and budget >= 0):
        raise ValueError(f"dp-central-epsilon must be a finite number >= 0 (0 = no budget), got {budget}")
    if budget > 0 and noise == 0:
        raise ValueError(f"dp-central-epsilon {budget} needs dp-central-noise > 0: without noise there is no ε")
    if noise > 0:  # the account's own checks (dp-delta, dp-accountant) apply with central DP alone too
        central_account(run_config)


def central_account(run_config: Mapping[str, Any]) -> CentralAccount | None:
    """The run's user-level ε account, or None without central DP noise (nothing to account)."""
    noise = float(run_config.get("dp-central-noise", 0.0))
    if not noise > 0:
        return None
    _, delta = _read("dp-delta", run_config.get("dp-delta", DEFAULT_DELTA), where="run config")
    _, accountant = _read("dp-accountant", run_config.get("dp-accountant", "prv"), where="run config")
    return CentralAccount(noise_multiplier=noise, delta=delta, accountant=accountant,
                          budget=float(run_config.get("dp-central-epsilon", 0.0)))

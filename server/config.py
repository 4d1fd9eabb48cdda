"""The run configuration: Flower's flat run config, parsed and validated up front.

Every key of ``[tool.flwr.app.config]`` maps to one field here (``num-server-rounds``
-> ``num_server_rounds``). Validation happens before any client trains; a bad value is
refused with a message that names the key and the value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import aggregation
from client.data import parse_partition
from privacy.settings import check_run_config as check_dp_config

DB_ENV = "FEDLORA_DB_URL"


def parse_ranks(value: str | int) -> tuple[int, ...]:
    """'4,8,16' -> (4, 8, 16). Refuses empty entries and non-integers, naming them."""
    text = str(value)
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            out.append(int(part))
        except ValueError:
            raise ValueError(f"ranks: {part!r} in {text!r} is not an integer") from None
    return tuple(out)


def default_db_url() -> str:
    env = os.environ.get(DB_ENV)
    if env:
        return env
    return f"sqlite:///{(Path.cwd() / 'runs' / 'fedlora.db').resolve()}"


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    aggregator: str = "fedavg"
    num_server_rounds: int = 3
    clients_per_round: int = 4
    min_clients: int = 1
    ranks: str = "4,8,16"
    max_rank: int = 64
    lora_alpha: float = 16.0
    target_modules: str = "q_proj,v_proj"
    learning_rate: float = 1e-3
    local_steps: int = 3
    batch_size: int = 8
    max_seq_len: int = 128
    model: str = "smollm2"
    data: str = "chatterbot"
    partition: str = "topic"
    eval_examples: int = 64
    eval_fraction: float = 0.1
    db_url: str = ""
    seed: int = 0
    round_timeout: float = 3600.0
    run_tag: str = ""
    aggregator_options: str = ""
    calibration_data: str = ""
    calibration_batches: int = 4
    checkpoint_dir: str = ""
    keep_checkpoints: int = 3
    resume_run_id: int = 0
    round_retries: int = 1
    on_insufficient: str = "stop"
    max_update_norm_ratio: float = 10.0
    max_payload_mb: float = 1024.0
    simulation_nodes: int = 0
    # differential privacy (privacy/settings.py documents each key; 0 / empty = off)
    dp_epsilon: float = 0.0
    dp_delta: float = 1e-5
    dp_noise_multiplier: float = 0.0
    dp_max_grad_norm: float = 1.0
    dp_accountant: str = "prv"
    dp_on_budget: str = "decline"
    dp_grad_sample_mode: str = "hooks"
    dp_state_dir: str = ""
    dp_central_clip: float = 0.0
    dp_central_noise: float = 0.0

    def __post_init__(self) -> None:
        aggregation.get_class(self.aggregator)  # unknown name: lists the valid ones
        _positive("num-server-rounds", self.num_server_rounds)
        _positive("clients-per-round", self.clients_per_round)
        _positive("min-clients", self.min_clients)
        _positive("max-rank", self.max_rank)
        _positive("local-steps", self.local_steps)
        _positive("batch-size", self.batch_size)
        _positive("max-seq-len", self.max_seq_len)
        _positive("eval-examples", self.eval_examples, allow_zero=True)
        if self.min_clients > self.clients_per_round:
            raise ValueError(
                f"min-clients ({self.min_clients}) exceeds clients-per-round ({self.clients_per_round})"
            )
        for rank in self.rank_list:
            check_rank(rank, self.max_rank)
        if not self.lora_alpha > 0:
            raise ValueError(f"lora-alpha must be > 0, got {self.lora_alpha}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning-rate must be > 0, got {self.learning_rate}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval-fraction must be in (0, 1), got {self.eval_fraction}")
        if not self.round_timeout > 0:
            raise ValueError(f"round-timeout must be > 0, got {self.round_timeout}")
        if not self.targets:
            raise ValueError(f"target-modules is empty: {self.target_modules!r}")
        parse_partition(self.partition)
        _positive("calibration-batches", self.calibration_batches)
        _positive("keep-checkpoints", self.keep_checkpoints)
        _positive("resume-run-id", self.resume_run_id, allow_zero=True)
        _positive("round-retries", self.round_retries, allow_zero=True)
        _positive("simulation-nodes", self.simulation_nodes, allow_zero=True)
        if self.on_insufficient not in ("stop", "skip"):
            raise ValueError(f"on-insufficient must be 'stop' or 'skip', got {self.on_insufficient!r}")
        if self.max_update_norm_ratio < 0:
            raise ValueError(f"max-update-norm-ratio must be >= 0 (0 = off), got {self.max_update_norm_ratio}")
        if self.max_payload_mb < 0:
            raise ValueError(f"max-payload-mb must be >= 0 (0 = off), got {self.max_payload_mb}")
        self.aggregator_kwargs  # parses, naming a malformed entry
        check_dp_config(self.to_flower())  # every dp-* key, naming a bad one

    @property
    def aggregator_kwargs(self) -> dict[str, Any]:
        """'solver=paper,ridge=0.1' -> {"solver": "paper", "ridge": 0.1}."""
        return parse_options(self.aggregator_options)

    @property
    def rank_list(self) -> tuple[int, ...]:
        return parse_ranks(self.ranks)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.target_modules.split(",") if t.strip())

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir).expanduser() if self.checkpoint_dir else Path.cwd() / "runs" / "checkpoints"

    @property
    def database_url(self) -> str:
        return self.db_url or default_db_url()

    def rank_for_partition(self, partition_id: int) -> int:
        ranks = self.rank_list
        return ranks[partition_id % len(ranks)]

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """From Flower's run config (hyphenated keys). Unknown keys are refused."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ValueError(f"unknown run-config keys {unknown}; valid keys: {sorted(known)}")
        kwargs = {}
        for key, value in run_config.items():
            field = known[key]
            kwargs[field.name] = _coerce(key, value, field.type)
        return cls(**kwargs)

    def to_flower(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}


def parse_options(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"aggregator-options: {item!r} is not of the form key=value")
        out[key.strip().replace("-", "_")] = _literal(raw.strip())
    return out


def _literal(raw: str) -> Any:
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def check_rank(rank: int, max_rank: int) -> None:
    if not 1 <= rank <= max_rank:
        raise ValueError(f"LoRA rank {rank} is outside the allowed range 1..{max_rank} (max-rank)")


def _positive(key: str, value: int, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{key} must be {'>= 0' if allow_zero else '>= 1'}, got {value}")


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    name = type_name if isinstance(type_name, str) else type_name.__name__
    try:
        if name == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if name == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"run-config {key}: {value!r} is not a valid {name}") from None

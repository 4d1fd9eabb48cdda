"""The run configuration: Flower's flat run config, parsed and validated up front.

Every key of ``[tool.flwr.app.config]`` maps to one field here (``num-server-rounds``
-> ``num_server_rounds``). Validation happens before any client trains; a bad value is
refused with a message that names the key and the value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import aggregation
from aggregation.base import check_rank
from aggregation.fed_sb import INIT_SOURCES
from core.data import parse_partition

DB_ENV = "FEDLORA_DB_URL"


def setting(default: Any, help: str, *, aliases: tuple[str, ...] = (), path: bool = False,
            internal: bool = False) -> Any:
    """One run-config key: its default and help, plus what the CLI needs to offer it.

    ``aliases``: extra flag spellings kept for ``simulate`` (``--rounds``, ``--lr``);
    ``path``: a local path the CLI makes absolute (the ServerApp and ClientApps run
    elsewhere); ``internal``: set by the CLI itself, not offered as a flag.
    """
    return field(default=default, metadata={"help": help, "aliases": aliases, "path": path, "internal": internal})


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
    """Every run-config key, declared once: type, default and help (``setting``).

    The CLI builds ``simulate``'s flags and ``--set KEY=VALUE`` from these fields, the test
    suite checks ``[tool.flwr.app.config]`` against their defaults, and Flower's run config
    is read back through ``from_flower``. A new key is one line here.
    """

    aggregator: str = setting("fedavg", "aggregation method (the registry's names)")
    num_server_rounds: int = setting(3, "rounds of federated training", aliases=('--rounds',))
    clients_per_round: int = setting(4, "clients sampled per round")
    min_clients: int = setting(1, "fewest usable replies for a round to count")
    ranks: str = setting("4,8,16", "LoRA rank per client, cycled over partition ids (simulation)")
    max_rank: int = setting(64, "the federation's largest LoRA rank; every rank lies in 1..max-rank")
    lora_alpha: float = setting(16.0, "lora_alpha (a node may set its own)", aliases=('--alpha',))
    target_modules: str = setting("q_proj,v_proj", "comma-separated module names that get adapters")
    learning_rate: float = setting(0.0, "local learning rate (0: the aggregator's recommended rate, "
                                        "recorded in the run's config as the number used)", aliases=('--lr',))
    local_steps: int = setting(3, "optimizer steps per client per round")
    batch_size: int = setting(8, "local batch size")
    max_seq_len: int = setting(128, "tokens per example (longer ones are truncated)")
    model: str = setting("smollm2", "'smollm2', 'tiny' (smoke test), a hub id or a local path")
    data: str = setting("chatterbot", "'chatterbot', a .jsonl file or directory, or hf:NAME[:SPLIT]", path=True)
    partition: str = setting("topic", "iid | dirichlet:ALPHA | topic | pathological:K | shard:N | file "
                                      "(flwr-datasets partitioners over category/source)")
    eval_examples: int = setting(64, "server-side held-out examples per evaluation (0: none)")
    eval_fraction: float = setting(0.1, "share of the data held out for the server's evaluation")
    fraction_evaluate: float = setting(0.0, "federated evaluation: share of the connected nodes that evaluate "
                                            "the global adapter on their own held-out slice in evaluated rounds "
                                            "(Flower's name; 0: off)")
    node_eval_fraction: float = setting(0.1, "federated evaluation: share of each node's data it holds out (and "
                                             "never trains on) for its evaluations; a node's own "
                                             "node-eval-fraction overrides it")
    node_eval_report: str = setting("per-node", "federated evaluation: per-node (every node's row is recorded) | "
                                                "aggregate (only the round's aggregate and spread)")
    eval_every: int = setting(2, "server-side evaluation every K rounds (round 0 and the last round always); "
                                 "it runs beside the next round's training")
    db_url: str = setting("", "SQLAlchemy URL of the round log (empty: $FEDLORA_DB_URL or runs/fedlora.db)", aliases=('--db',))
    seed: int = setting(0, "seed for partitioning, sampling and initialisation")
    round_timeout: float = setting(3600.0, "seconds a round waits for replies")
    run_tag: str = setting("", "set by the CLI: finds the run's row", internal=True)
    aggregator_options: str = setting("", "method options, e.g. 'solver=paper,ridge=0.01' (lora-fair)")
    sb_init: str = setting("server-public", "fed-sb: source of the LoRA-SB init: server-public (the coordinator's "
                                            "public examples, apart from the evaluation ones) | federated (a round 0 "
                                            "over the nodes' data) | random (ablation: no LoRA-SB init)")
    calibration_data: str = setting("", "fed-sb server-public init: public data to use instead of the run's "
                                        "held-out examples", path=True)
    calibration_batches: int = setting(4, "fed-sb: batches of batch-size examples for the LoRA-SB init "
                                          "(per node with sb-init=federated)")
    sb_init_lr: float = setting(0.0, "fed-sb: step size of the LoRA-SB init's approximated first step, "
                                     "dW = -sb-init-lr * sign(sum of gradients) (0: the aggregator's tuned init "
                                     "step, else the run's learning-rate as in LoRA-SB; recorded as the number used)")
    sb_init_oversample: int = setting(10, "fed-sb federated init: sketch oversampling p (range sketch "
                                          "max-rank+p columns, co-range sketch max-rank+2p rows)")
    sb_init_dp_share: float = setting(0.25, "fed-sb federated init: share of a DP node's remaining ε target its "
                                            "sketch may spend (a fixed dp-noise-multiplier is used as it is)")
    server_threads: int = setting(1, "BLAS/OpenMP threads for the server's linear algebra, scoped to it "
                                     "(0: no limit)")
    checkpoint_dir: str = setting("", "checkpoint root (empty: runs/checkpoints)", path=True)
    keep_checkpoints: int = setting(3, "checkpoints kept per run")
    resume_run_id: int = setting(0, "continue this run from its last checkpoint (fedlora resume sets it)", internal=True)
    round_retries: int = setting(1, "re-samples when fewer than min-clients reply")
    on_insufficient: str = setting("stop", "stop | skip, after the retries")
    max_update_norm_ratio: float = setting(10.0, "reject an update this many times the median norm (0: off)")
    max_payload_mb: float = setting(1024.0, "reject a reply above this size (0: off)")
    simulation_nodes: int = setting(0, "simulated nodes (simulate's --num-clients sets it)", internal=True)
    # differential privacy: typed here, checked by privacy.settings (0 / empty = off)
    dp_epsilon: float = setting(0.0, "local DP-SGD: per-client target ε (0: off)")
    dp_delta: float = setting(1e-5, "DP δ")
    dp_noise_multiplier: float = setting(0.0, "local DP-SGD: fixed σ (0: calibrated from ε)")
    dp_max_grad_norm: float = setting(1.0, "local DP-SGD: per-example clipping bound")
    dp_accountant: str = setting("prv", "prv | rdp")
    dp_on_budget: str = setting("decline", "decline | truncate, when ε would pass the target")
    dp_grad_sample_mode: str = setting("hooks", "hooks | ghost | functorch")
    dp_state_dir: str = setting("", "per-node privacy ledgers (empty: .cache/privacy)", path=True)
    dp_central_clip: float = setting(0.0, "central DP: per-client update clip (0: off)")
    dp_central_noise: float = setting(0.0, "central DP: noise multiplier")
    dp_central_epsilon: float = setting(0.0, "central DP: user-level ε budget; the run stops before a round "
                                             "would pass it (0: no budget)")
    mlflow_uri: str = setting("", "MLflow tracking URI (e.g. sqlite:///abs/mlflow.db, http://host:5000): "
                                  "log the run there too (empty: off)")

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
        _positive("eval-every", self.eval_every)
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ValueError(f"fraction-evaluate must be in [0, 1], got {self.fraction_evaluate}")
        check_node_eval_fraction(self.node_eval_fraction, where="node-eval-fraction")
        if self.node_eval_report not in NODE_EVAL_REPORTS:
            raise ValueError(f"node-eval-report must be one of {', '.join(NODE_EVAL_REPORTS)}, "
                             f"got {self.node_eval_report!r}")
        if self.min_clients > self.clients_per_round:
            raise ValueError(
                f"min-clients ({self.min_clients}) exceeds clients-per-round ({self.clients_per_round})"
            )
        for rank in self.rank_list:
            check_rank(rank, self.max_rank)
        if not self.lora_alpha > 0:
            raise ValueError(f"lora-alpha must be > 0, got {self.lora_alpha}")
        if self.learning_rate == 0:
            # the one place "unset" is resolved: every reader (clients' train config, Fed-SB's
            # init, the run's recorded config) sees the number, never the 0
            object.__setattr__(self, "learning_rate", aggregation.recommended(self.aggregator).learning_rate)
        if not self.learning_rate > 0:
            raise ValueError(f"learning-rate must be > 0 (0: the aggregator's recommendation), "
                             f"got {self.learning_rate}")
        if self.sb_init_lr == 0:  # unset: the method's tuned init step, else LoRA-SB's own choice, the
            # training rate (README, "Fed-SB init")
            tuned = aggregation.recommended(self.aggregator).init_learning_rate
            object.__setattr__(self, "sb_init_lr", tuned or self.learning_rate)
        if not self.sb_init_lr > 0:
            raise ValueError(f"sb-init-lr must be > 0 (0: the run's learning-rate), got {self.sb_init_lr}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval-fraction must be in (0, 1), got {self.eval_fraction}")
        if not self.round_timeout > 0:
            raise ValueError(f"round-timeout must be > 0, got {self.round_timeout}")
        if not self.targets:
            raise ValueError(f"target-modules is empty: {self.target_modules!r}")
        parse_partition(self.partition)
        _positive("calibration-batches", self.calibration_batches)
        if self.sb_init not in INIT_SOURCES:
            raise ValueError(f"sb-init must be one of {', '.join(INIT_SOURCES)}, got {self.sb_init!r}")
        if self.calibration_data and self.sb_init != "server-public":
            raise ValueError(f"calibration-data is only read by sb-init=server-public, not sb-init={self.sb_init}")
        _positive("sb-init-oversample", self.sb_init_oversample, allow_zero=True)
        if not 0.0 < self.sb_init_dp_share <= 1.0:
            raise ValueError(f"sb-init-dp-share must be in (0, 1], got {self.sb_init_dp_share}")
        _positive("server-threads", self.server_threads, allow_zero=True)
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
        # dp-* keys are typed here and checked by privacy.settings.parse_run_config, the
        # one reader of their meaning (core sits below privacy and does not import it)

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
        known = cls.settings()
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ValueError(f"unknown run-config keys {unknown}; valid keys: {sorted(known)}")
        kwargs = {}
        for key, value in run_config.items():
            declared = known[key]
            kwargs[declared.name] = coerce(key, value, declared.type)
        return cls(**kwargs)

    @classmethod
    def settings(cls) -> dict[str, Field]:
        """Flower key (``num-server-rounds``) -> its declaration, in declaration order."""
        return {flower_key(f.name): f for f in fields(cls)}

    def to_flower(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}


def flower_key(name: str) -> str:
    return name.replace("_", "-")


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




NODE_EVAL_REPORTS = ("per-node", "aggregate")


def check_node_eval_fraction(value: float, *, where: str) -> None:
    """A node's held-out share: the one statement of its range (run config and node config)."""
    if not 0.0 < value < 1.0:
        raise ValueError(f"{where} must be in (0, 1), got {value}")


def _positive(key: str, value: int, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{key} must be {'>= 0' if allow_zero else '>= 1'}, got {value}")


def coerce(key: str, value: Any, type_name: Any) -> Any:
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

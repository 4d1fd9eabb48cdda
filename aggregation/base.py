"""The data that crosses the wire and the protocol every aggregator implements.

Federated LoRA methods disagree about almost everything: what clients upload (A and
B; B only; an r x r matrix R), what the server sends down (per-client truncated
factors; a stacked update to fold into the base weights; corrected factors; R only)
and what persists across rounds. Rather than hiding those differences in conventions
inside each file, they are explicit data here:

* ``Downlink.adapter``   - factor values the client loads into its adapter;
                           empty means "start a fresh adapter" (PEFT's default init).
* ``Downlink.frozen``    - run-constant factors (Fed-SB's A and B, FFA-LoRA's A); the
                           strategy delivers them once per node, not every round.
* ``Downlink.trainable`` - which factors the client trains.
* ``Aggregation.base_update`` - a low-rank ``B @ A`` that every client folds into its
                           copy of the base weights (FLoRA's stack, FedEx-LoRA's
                           residual). The strategy keeps the log of these and sends
                           each node exactly the entries it lacks.

Conventions (all aggregators follow them, the tests check them):

* W is ``d_out x d_in``; ``B`` is ``d_out x r``, ``A`` is ``r x d_in``, ``R`` is ``r x r``.
* A client's adapter contributes ``s * B @ A`` (or ``s * B @ R @ A``) with
  ``s = alpha / rank``, PEFT's scaling. Uploads carry the raw, unscaled factors.
* Server-side math happens on *scale-folded* factors (``s`` multiplied into B or R),
  so clients with different ranks and alphas mix correctly; ``Downlink.adapter`` is
  un-folded again for the receiving client's own ``s``.
* ``global_delta`` returns the global adapter as folded low-rank factors
  ``{"B": d_out x q, "A": q x d_in}``: the global model is
  ``W0 + sum(base updates) + B @ A``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

Factors = dict[str, np.ndarray]  # {"A": ..., "B": ..., "R": ...}
Tensors = dict[str, Factors]  # module name -> factors

FACTOR_NAMES = frozenset({"A", "B", "R"})


@dataclass(frozen=True)
class ModuleShape:
    """Shape of one adapted weight matrix W (``d_out x d_in``)."""

    d_out: int
    d_in: int

    def __post_init__(self) -> None:
        if self.d_out < 1 or self.d_in < 1:
            raise ValueError(f"module dimensions must be positive, got {self}")


@dataclass(frozen=True)
class ModelSpec:
    """What an aggregator needs to know about the model and the run."""

    modules: Mapping[str, ModuleShape]
    max_rank: int
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.modules:
            raise ValueError("ModelSpec needs at least one adapted module")
        if self.max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {self.max_rank}")


@dataclass(frozen=True)
class ClientInfo:
    """What the server knows about a node before it trains: learnt from the node."""

    node_id: str
    rank: int
    alpha: float

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank} for node {self.node_id}")
        if not self.alpha > 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha} for node {self.node_id}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class ClientUpdate:
    """One client's reply: raw (unscaled) factors after local training."""

    node_id: str
    num_examples: int
    rank: int
    alpha: float
    tensors: Tensors
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_examples < 1:
            raise ValueError(
                f"num_examples must be >= 1, got {self.num_examples} for node {self.node_id}"
            )
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank} for node {self.node_id}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def info(self) -> ClientInfo:
        return ClientInfo(node_id=self.node_id, rank=self.rank, alpha=self.alpha)


@dataclass(frozen=True)
class Downlink:
    """What one client receives before it trains (see the module docstring).

    ``uplink``: the factors this client uploads this round, where a method's upload
    changes by round (RoLoRA: B, then A); ``None`` means the class's ``uplink``. A
    factor it trains but does not upload stays on the node (FedSA-LoRA's B).
    """

    adapter: Tensors
    trainable: frozenset[str]
    frozen: Tensors = field(default_factory=dict)
    uplink: frozenset[str] | None = None

    def __post_init__(self) -> None:
        unknown = (self.trainable | (self.uplink or frozenset())) - FACTOR_NAMES
        if unknown:
            raise ValueError(f"unknown trainable or uplink factors {sorted(unknown)}")
        if self.uplink is not None and not self.uplink:
            raise ValueError("a downlink's uplink names at least one factor (None: the method's own)")

    def uploads(self, default: frozenset[str]) -> frozenset[str]:
        """The factors this client uploads: this round's ``uplink``, else the method's ``default``."""
        return default if self.uplink is None else self.uplink

    def personal(self, default: frozenset[str]) -> frozenset[str]:
        """Factors the client trains but never uploads: they stay on the node."""
        return self.trainable - self.uploads(default)


@dataclass(frozen=True)
class Aggregation:
    """The outcome of one round of aggregation."""

    state: Any
    base_update: Tensors = field(default_factory=dict)


@dataclass(frozen=True)
class WeightedSum:
    """A method whose aggregate is a weighted sum of (scale-folded) uploads, and its layout.

    What central DP (``privacy.central``) needs to clip and noise it: for each uploaded
    factor, which entries a rank-r upload fills (``"rows"``: the first r rows, A;
    ``"cols"``: the first r columns, B; ``"block"``: the leading r x r block, R), and
    whether each entry is averaged over the clients that hold it (``renormalised``).
    """

    coverage: Mapping[str, str]
    renormalised: bool

    def __post_init__(self) -> None:
        bad = {f: c for f, c in self.coverage.items() if f not in FACTOR_NAMES or c not in COVERAGES}
        if bad or not self.coverage:
            raise ValueError(f"weighted-sum coverage {dict(self.coverage)} must map factors "
                             f"{sorted(FACTOR_NAMES)} to one of {sorted(COVERAGES)}")


COVERAGES = frozenset({"rows", "cols", "block"})


@dataclass(frozen=True)
class Recommended:
    """A method's recommended local training settings: used where the run leaves them unset.

    ``learning_rate`` is what ``learning-rate = 0`` (the run config's default) resolves to
    (``core.config``); ``source`` says where the number comes from (our tuning sweep,
    ``python -m simulations.tune``, or "untuned"), ``paper`` the method paper's own setting,
    so a user sees both. ``init_learning_rate`` is the step of the method's own init where it
    has one (Fed-SB's LoRA-SB step, run config ``sb-init-lr``), tuned apart from the training
    rate: 0 leaves it at the training rate. A class declares it as
    ``recommended = Recommended(...)``; one that does not gets ``DEFAULT_RECOMMENDED``
    (``aggregation.recommended``).
    """

    learning_rate: float
    source: str
    paper: str = ""
    init_learning_rate: float = 0.0

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"a recommended learning rate must be > 0, got {self.learning_rate}")
        if not self.init_learning_rate >= 0:
            raise ValueError(f"a recommended init learning rate must be >= 0, got {self.init_learning_rate}")


#: for a method without a tuned value of its own: LoRA's usual rate (the run config's old default)
DEFAULT_RECOMMENDED = Recommended(learning_rate=1e-3, source="default for methods without a tuned value (untuned)")


@runtime_checkable
class Aggregator(Protocol):
    """A federated LoRA aggregation method.

    Implementations are pure: no argument is mutated, state objects are replaced,
    never edited in place, and everything in a state is numpy arrays, numbers and
    strings (so it serialises for checkpoints).
    """

    #: factors each client must upload, e.g. {"A", "B"} or {"R"}; a method whose upload
    #: changes by round declares every factor it may ask for, and each round's in
    #: ``Downlink.uplink``
    uplink: frozenset[str]
    #: adapter architecture the client builds: "lora" (B @ A) or "bra" (B @ R @ A)
    adapter_kind: str
    #: the aggregate as a weighted sum of the uploads (central DP applies), or the reason
    #: it is not one (shown when central DP is asked for)
    weighted_sum: WeightedSum | str
    #: takes public calibration data for its initialisation (``calibration-data``)
    accepts_calibration: bool

    def init_state(self, spec: ModelSpec) -> Any: ...

    def downlink(self, state: Any, client: ClientInfo) -> Downlink: ...

    def aggregate(self, state: Any, updates: Sequence[ClientUpdate]) -> Aggregation: ...

    def global_delta(self, state: Any) -> Tensors:
        """The global adapter as folded factors {"B": d_out x q, "A": q x d_in}."""
        ...

    def client_delta(self, state: Any, update: ClientUpdate) -> Tensors:
        """One client's adapter ``s_k * dW_k`` as folded factors {"B", "A"}.

        ``state`` is the state the client trained from (needed where the upload is
        only part of the adapter, as in Fed-SB and FFA-LoRA).
        """
        ...


def check_rank(rank: int, max_rank: int, *, node: str | None = None) -> None:
    """Every LoRA rank lies in 1..max_rank: the one statement of that range, used everywhere
    (run config, ``client start``, the strategy's rank query, the aggregators' downlinks)."""
    if not 1 <= rank <= max_rank:
        who = f"node {node}: " if node is not None else ""
        raise ValueError(f"{who}LoRA rank {rank} is outside the allowed range 1..{max_rank} (max-rank)")


def expected_shapes(
    kind: str, factors: frozenset[str], shape: ModuleShape, rank: int
) -> dict[str, tuple[int, int]]:
    """Shapes of the named factors of a rank-``rank`` adapter on ``shape``."""
    table = {"A": (rank, shape.d_in), "B": (shape.d_out, rank), "R": (rank, rank)}
    if kind not in ("lora", "bra"):
        raise ValueError(f"unknown adapter kind {kind!r}; expected 'lora' or 'bra'")
    return {name: table[name] for name in sorted(factors)}

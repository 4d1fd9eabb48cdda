"""Partitioning the examples among clients, through flwr-datasets' partitioners.

Specs (``partition(examples, spec, num_partitions, seed)``):
  ``iid``              a seeded shuffle cut into equal contiguous shares (``IidPartitioner``)
  ``dirichlet:ALPHA``  per ``category``, shares drawn from Dir(ALPHA) (``DirichletPartitioner``)
  ``topic``            whole categories per client (``NaturalIdPartitioner`` over ``category``)
  ``pathological:K``   K categories per client (``PathologicalPartitioner``)
  ``shard:N``          N label-sorted shards per client (``ShardPartitioner``, as in FedAvg's paper)
  ``file``             one client per source file (``NaturalIdPartitioner`` over ``source``)

Every spec runs flwr-datasets' own pipeline (what ``FederatedDataset`` does with a hub
dataset) on an in-memory ``datasets.Dataset`` of ``index``/``category``/``source``:
shuffle with the seed, hand it to the partitioner (seeded too), read each partition's
``index`` column back. The same seed gives the same partitions on every process.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # the type only: core.data imports this module
    import datasets
    from flwr_datasets.partitioner import Partitioner

    from core.data import Example


@dataclass(frozen=True)
class Scheme(ABC):
    """One partition spec, parsed: builds the flwr-datasets partitioner for it."""

    form: ClassVar[str]  # how the spec is written, for messages

    @classmethod
    def parse(cls, arg: str) -> Scheme:
        if arg:
            raise ValueError(f"takes no argument, got {arg!r}")
        return cls()

    @abstractmethod
    def partitioner(self, num_partitions: int, seed: int) -> Partitioner: ...

    def assign(self, table: datasets.Dataset, num_partitions: int, seed: int) -> list[list[int]]:
        """Example indices per partition."""
        return _load_all(self.partitioner(num_partitions, seed), table, num_partitions)


def _load_all(partitioner: Partitioner, table: datasets.Dataset, count: int) -> list[list[int]]:
    partitioner.dataset = table
    return [list(partitioner.load_partition(i)["index"]) for i in range(count)]


def _count(arg: str, what: str) -> int:
    try:
        value = int(arg)
    except ValueError:
        raise ValueError(f"{what} must be a whole number >= 1, got {arg!r}") from None
    if value < 1:
        raise ValueError(f"{what} must be >= 1, got {value}")
    return value


class Iid(Scheme):
    form = "iid"

    def partitioner(self, num_partitions: int, seed: int) -> Partitioner:
        from flwr_datasets.partitioner import IidPartitioner

        return IidPartitioner(num_partitions=num_partitions)  # contiguous cuts of the shuffled table


@dataclass(frozen=True)
class Dirichlet(Scheme):
    alpha: float
    form = "dirichlet:ALPHA"

    @classmethod
    def parse(cls, arg: str) -> Scheme:
        try:
            alpha = float(arg or 0.5)  # a bare 'dirichlet' keeps meaning ALPHA = 0.5, as before
        except ValueError:
            raise ValueError(f"dirichlet concentration ALPHA must be a number, got {arg!r}") from None
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"dirichlet concentration ALPHA must be > 0 and finite, got {arg!r}")
        return cls(alpha)

    def partitioner(self, num_partitions: int, seed: int) -> Partitioner:
        from flwr_datasets.partitioner import DirichletPartitioner

        # min_partition_size=1, not flwr's 10: a partition only has to be non-empty here
        # (a client trains on a handful of examples), and a 10-row floor would refuse the
        # small JSONL sets this is used with (40 rows over 4 clients) after ten redraws.
        return DirichletPartitioner(num_partitions=num_partitions, partition_by="category", alpha=self.alpha,
                                    min_partition_size=1, self_balancing=False, shuffle=True, seed=seed)


class Topic(Scheme):
    form = "topic"

    def partitioner(self, num_partitions: int, seed: int) -> Partitioner:
        from flwr_datasets.partitioner import NaturalIdPartitioner

        return NaturalIdPartitioner(partition_by="category")

    def assign(self, table: datasets.Dataset, num_partitions: int, seed: int) -> list[list[int]]:
        # Ours differs: NaturalIdPartitioner makes one partition per category (21 for
        # chatterbot), but a federation rarely has exactly as many clients as topics. So
        # client i takes natural-id partitions i, i + n, i + 2n, ... (sorted category order):
        # with as many clients as categories this *is* NaturalIdPartitioner's partitioning.
        natural = _natural_ids(self.partitioner(num_partitions, seed), table)
        return [[i for part in natural[client::num_partitions] for i in part] for client in range(num_partitions)]


class File(Scheme):
    form = "file"

    def partitioner(self, num_partitions: int, seed: int) -> Partitioner:
        from flwr_datasets.partitioner import NaturalIdPartitioner

        return NaturalIdPartitioner(partition_by="source")

    def assign(self, table: datasets.Dataset, num_partitions: int, seed: int) -> list[list[int]]:
        natural = _natural_ids(self.partitioner(num_partitions, seed), table)
        if len(natural) != num_partitions:
            raise ValueError(f"needs one client per file: {len(natural)} files, {num_partitions} clients")
        return natural


def _natural_ids(partitioner: Partitioner, table: datasets.Dataset) -> list[list[int]]:
    partitioner.dataset = table
    # NaturalIdPartitioner draws a tqdm bar on stderr over the rows: noise in every
    # client's log for a loop of a few thousand rows
    with contextlib.redirect_stderr(io.StringIO()):
        return [list(partitioner.load_partition(i)["index"]) for i in range(partitioner.num_partitions)]


@dataclass(frozen=True)
class Pathological(Scheme):
    classes: int
    form = "pathological:K"

    @classmethod
    def parse(cls, arg: str) -> Scheme:
        return cls(_count(arg, "pathological K (categories per client)"))

    def partitioner(self, num_partitions: int, seed: int) -> Partitioner:
        from flwr_datasets.partitioner import PathologicalPartitioner

        # flwr's default "random" assignment: categories no client drew are left out (it warns)
        return PathologicalPartitioner(num_partitions=num_partitions, partition_by="category",
                                       num_classes_per_partition=self.classes, class_assignment_mode="random",
                                       shuffle=True, seed=seed)


@dataclass(frozen=True)
class Shard(Scheme):
    shards: int
    form = "shard:N"

    @classmethod
    def parse(cls, arg: str) -> Scheme:
        return cls(_count(arg, "shard N (shards per client)"))

    def partitioner(self, num_partitions: int, seed: int) -> Partitioner:
        from flwr_datasets.partitioner import ShardPartitioner

        # shard size = rows // (clients * N); the rows left over are not used (flwr's default)
        return ShardPartitioner(num_partitions=num_partitions, partition_by="category",
                                num_shards_per_partition=self.shards, shuffle=True, seed=seed)

    def assign(self, table: datasets.Dataset, num_partitions: int, seed: int) -> list[list[int]]:
        if len(table) < num_partitions * self.shards:  # flwr's shard size would be 0: ZeroDivisionError there
            raise ValueError(f"{num_partitions} clients x {self.shards} shards need at least "
                             f"{num_partitions * self.shards} examples")
        with warnings.catch_warnings():
            # the partitioner's datasets.sort() trips a pyarrow 25 deprecation inside datasets
            # itself, nothing a user can act on
            warnings.filterwarnings("ignore", message="Specifying null_placement", category=FutureWarning)
            return super().assign(table, num_partitions, seed)


#: spec name -> its scheme; ``partition`` and the run config's check read only this table
SCHEMES: dict[str, type[Scheme]] = {"iid": Iid, "dirichlet": Dirichlet, "topic": Topic,
                                    "pathological": Pathological, "shard": Shard, "file": File}


def valid_forms() -> str:
    return ", ".join(cls.form for cls in SCHEMES.values())


def parse_partition(spec: str) -> Scheme:
    """'dirichlet:0.5' -> Dirichlet(alpha=0.5); a bad spec's error lists the valid forms."""
    name, _, arg = spec.partition(":")
    if name not in SCHEMES:
        raise ValueError(f"unknown partition {spec!r}; valid forms: {valid_forms()}")
    try:
        return SCHEMES[name].parse(arg)
    except ValueError as exc:
        raise ValueError(f"partition {spec!r}: {exc} (valid forms: {valid_forms()})") from None


def partition(examples: Sequence[Example], spec: str, num_partitions: int, seed: int) -> list[list[Example]]:
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    scheme = parse_partition(spec)
    try:
        assignment = scheme.assign(_table(examples, seed), num_partitions, seed)
    except ValueError as exc:
        raise ValueError(f"partition {spec!r} of {len(examples)} examples over {num_partitions} clients: "
                         f"{exc}") from None
    parts = [[examples[i] for i in indices] for indices in assignment]
    empty = [i for i, p in enumerate(parts) if not p]
    if empty:
        raise ValueError(
            f"partition {spec!r} leaves partitions {empty} of {num_partitions} empty: "
            "use fewer clients or another partitioner"
        )
    return parts


def _table(examples: Sequence[Example], seed: int) -> datasets.Dataset:
    """What the partitioners read, shuffled with the seed as ``FederatedDataset`` does."""
    import datasets

    table = datasets.Dataset.from_dict({"index": list(range(len(examples))),
                                        "category": [ex.category for ex in examples],
                                        "source": [ex.source for ex in examples]})
    return table.shuffle(seed=seed)

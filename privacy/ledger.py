"""Durable per-node privacy history: one JSON file per (node identity, dataset).

Why a file and not Flower's ``context.state``: that state lives in the SuperNode's
memory and is gone after a restart or a new run, while the privacy loss of a dataset
accumulates for as long as the data is trained on. ε only composes correctly if every
step ever taken on the data is in the history, so the history outlives processes and
runs: it is keyed by the node's stable identity and a fingerprint of its examples,
written atomically (temporary file, fsync, rename), and read-modify-written under an
exclusive ``flock`` so two processes on one node cannot both spend the same budget.

A file that exists but cannot be read is an error, never an empty history: silently
starting from zero would hand out a fresh budget.

The file also keeps, per run, the noise multiplier fixed when that run first trained
(``plans``): it is calibrated once from the run's planned steps and reused every round.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from privacy.accounting import History, check_history

FORMAT_VERSION = 1


def dataset_fingerprint(examples: Sequence[Any]) -> str:
    """sha256 over the sorted per-example digests: the same data in any order matches.

    Examples are anything with ``prompt`` and ``response`` (``core.data.Example``).
    Duplicates count, since each copy is a record that can be sampled.
    """
    digests = sorted(
        hashlib.sha256(f"{len(ex.prompt)}:{ex.prompt}|{ex.response}".encode()).hexdigest() for ex in examples
    )
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class NoisePlan:
    """The noise multiplier a run fixed once, and what it was calibrated for."""

    noise_multiplier: float
    sample_rate: float
    planned_steps: int

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ValueError(f"plan noise multiplier must be > 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"plan sample rate must be in (0, 1], got {self.sample_rate}")
        if self.planned_steps < 1:
            raise ValueError(f"plan steps must be >= 1, got {self.planned_steps}")


@dataclass(frozen=True, kw_only=True)
class LedgerState:
    node: str
    dataset: str
    history: History = ()
    plans: Mapping[str, NoisePlan] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.node:
            raise ValueError("ledger node identity is empty")
        if not re.fullmatch(r"[0-9a-f]{64}", self.dataset):
            raise ValueError(f"ledger dataset fingerprint {self.dataset!r} is not a sha256 hex digest")
        object.__setattr__(self, "history", check_history(self.history))
        # read-only view of a private copy: a frozen state must not change behind our back
        object.__setattr__(self, "plans", MappingProxyType(dict(self.plans)))

    def with_history(self, history: History) -> LedgerState:
        return replace(self, history=history)

    def with_plan(self, run: str, plan: NoisePlan) -> LedgerState:
        return replace(self, plans={**self.plans, run: plan})

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "node": self.node,
            "dataset": self.dataset,
            "history": [list(entry) for entry in self.history],
            "plans": {
                run: {"noise_multiplier": p.noise_multiplier, "sample_rate": p.sample_rate,
                      "planned_steps": p.planned_steps}
                for run, p in sorted(self.plans.items())
            },
            "updated": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LedgerState:
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported privacy ledger version {data.get('version')!r}")
        return cls(
            node=str(data["node"]),
            dataset=str(data["dataset"]),
            history=check_history(data["history"]),
            plans={run: NoisePlan(**plan) for run, plan in data.get("plans", {}).items()},
        )


class PrivacyLedger:
    """The privacy history file of one node's dataset under ``directory``."""

    def __init__(self, *, directory: Path, node: str, dataset: str) -> None:
        if not node:
            raise ValueError("privacy ledger needs a node identity")
        self.directory = Path(directory)
        self.node = node
        self.dataset = dataset
        key = hashlib.sha256(f"{node}\n{dataset}".encode()).hexdigest()[:24]
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", node)[:48]
        self.path = self.directory / f"{slug}-{key}.json"

    def empty(self) -> LedgerState:
        return LedgerState(node=self.node, dataset=self.dataset)

    @contextlib.contextmanager
    def locked(self) -> Iterator[PrivacyLedger]:
        """Exclusive lock for a read-plan-train-write cycle (other processes wait)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield self
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def load(self) -> LedgerState:
        if not self.path.exists():
            return self.empty()
        try:
            state = LedgerState.from_json(json.loads(self.path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"privacy ledger {self.path} is unreadable ({exc}); refusing to start from an empty "
                "history, which would grant a fresh budget. Restore or remove it deliberately."
            ) from None
        if (state.node, state.dataset) != (self.node, self.dataset):
            raise ValueError(f"privacy ledger {self.path} belongs to {state.node!r}/{state.dataset[:12]}")
        return state

    def save(self, state: LedgerState) -> None:
        """Atomic replace: a reader sees the old file or the new one, never half of one."""
        if (state.node, state.dataset) != (self.node, self.dataset):
            raise ValueError(f"ledger state for {state.node!r} cannot be saved in {self.path}")
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{self.path.stem}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(state.to_json(), fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        # the rename itself must survive a crash too
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

"""A node's personal factors on disk: what it trains and never uploads (FedSA-LoRA's B).

One ``.npz`` per (run, node): ``<directory>/<run key>/<node>.npz``, the factors as
float32 arrays named ``module|factor`` plus a JSON header (rank, alpha, the round that
trained them). No pickle. Written to a temporary name, fsynced and renamed, so a crash
leaves the previous round's file. The node writes it (``client.personal``); ``fedlora
export RUN --node NAME`` reads it on the node's machine (``server.personal_export``).

The run key is the run's tag (``run-tag``), which a resumed run keeps, so a resume
continues with the B the node had; the node is its stable name (``node-name``, or
``partition-N`` in simulation), never Flower's per-run node id.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aggregation.base import Tensors
from core.presets import cache_dir

SEP = "|"
HEADER = "personal.json"
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def default_directory() -> Path:
    """``<project cache>/personal`` (``FEDLORA_CACHE`` moves the cache)."""
    return cache_dir() / "personal"


@dataclass(frozen=True)
class PersonalFactors:
    tensors: Tensors
    rank: int
    alpha: float
    server_round: int


@dataclass(frozen=True, kw_only=True)
class PersonalStore:
    directory: Path
    run_key: str
    node: str

    def __post_init__(self) -> None:
        for what, value in (("run key", self.run_key), ("node name", self.node)):
            if not SAFE_NAME.fullmatch(value):
                raise ValueError(f"personal-factor {what} {value!r} is not a safe file name "
                                 "(letters, digits, '.', '_', '-')")

    @property
    def path(self) -> Path:
        return Path(self.directory) / self.run_key / f"{self.node}.npz"

    def load(self) -> PersonalFactors | None:
        """The stored factors, or None when this node has none for this run yet."""
        if not self.path.exists():
            return None
        try:
            with zipfile.ZipFile(self.path) as archive:
                header: dict[str, Any] = json.loads(archive.read(HEADER))
                tensors: Tensors = {}
                for key in header["arrays"]:
                    module, _, factor = key.rpartition(SEP)
                    tensors.setdefault(module, {})[factor] = np.load(io.BytesIO(archive.read(key + ".npy")),
                                                                    allow_pickle=False)
            return PersonalFactors(tensors=tensors, rank=int(header["rank"]), alpha=float(header["alpha"]),
                                   server_round=int(header["server-round"]))
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise ValueError(f"personal factors in {self.path} cannot be read: {exc}") from exc

    def save(self, factors: PersonalFactors) -> Path:
        keys = [f"{m}{SEP}{f}" for m in sorted(factors.tensors) for f in sorted(factors.tensors[m])]
        header = {"rank": factors.rank, "alpha": factors.alpha, "server-round": factors.server_round,
                  "run-key": self.run_key, "node": self.node, "arrays": keys}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.node}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                with zipfile.ZipFile(fh, "w") as archive:
                    archive.writestr(HEADER, json.dumps(header))
                    for key in keys:
                        module, _, factor = key.rpartition(SEP)
                        buffer = io.BytesIO()
                        np.save(buffer, np.asarray(factors.tensors[module][factor], np.float32), allow_pickle=False)
                        archive.writestr(key + ".npy", buffer.getvalue())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.path

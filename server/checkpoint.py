"""Round checkpoints: everything needed to continue a run from its last round.

A checkpoint holds the aggregator's cross-round state, the base-update log, the
round counter, the client-sampling RNG state and the run config with its hash. It
is one ``.npz`` file (arrays plus a JSON header; no pickle), written to a temporary
name and renamed, then referenced from the database in the same transaction as the
round's rows. A crash between the two leaves an unreferenced file that the redone
round overwrites; the database only ever points at complete checkpoints, and the
file's sha256 is checked on load.

What is deliberately *not* saved: what the server believes each node holds. After a
restart the nodes are new processes (and Flower gives them new ids), so every node
is asked again and sent the whole base-update log.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aggregation.base import Tensors
from aggregation.serialize import from_tree, to_tree

# Keys that may legitimately differ between a run and its resumption.
VOLATILE_KEYS = frozenset({"resume-run-id", "db-url", "round-timeout", "checkpoint-dir", "keep-checkpoints"})


def config_hash(config: dict[str, Any]) -> str:
    stable = {k: v for k, v in sorted(config.items()) if k not in VOLATILE_KEYS}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Checkpoint:
    round: int
    aggregator: str
    state: Any
    merge_log: list[tuple[int, Tensors]]
    rng_state: dict[str, Any]
    config: dict[str, Any]

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)


class CheckpointError(RuntimeError):
    pass


def save(checkpoint: Checkpoint, directory: Path, run_id: int) -> tuple[Path, str]:
    """Write atomically; returns (path, sha256)."""
    arrays: dict[str, np.ndarray] = {}
    header = {
        "format": 1,
        "round": checkpoint.round,
        "aggregator": checkpoint.aggregator,
        "state": to_tree(checkpoint.state, arrays),
        "merge_log": [[r, to_tree(t, arrays, f"merge{r}")] for r, t in checkpoint.merge_log],
        "rng_state": checkpoint.rng_state,
        "config": checkpoint.config,
        "config_hash": checkpoint.config_hash,
    }
    names = {f"a{i}": key for i, key in enumerate(arrays)}
    header["arrays"] = names
    buffer = io.BytesIO()
    np.savez(buffer, __header__=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
             **{short: arrays[key] for short, key in names.items()})
    data = buffer.getvalue()
    directory = directory / f"run-{run_id}"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"round-{checkpoint.round:05d}.npz"
    tmp = path.with_suffix(".npz.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path, hashlib.sha256(data).hexdigest()


def load(path: Path, sha256: str | None = None) -> Checkpoint:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointError(f"checkpoint {path} does not match its recorded sha256 (corrupt or replaced)")
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        header = json.loads(bytes(npz["__header__"]).decode())
        arrays = {key: npz[short] for short, key in header["arrays"].items()}
    return Checkpoint(
        round=int(header["round"]),
        aggregator=header["aggregator"],
        state=from_tree(header["state"], arrays),
        merge_log=[(int(r), from_tree(t, arrays)) for r, t in header["merge_log"]],
        rng_state=header["rng_state"],
        config=header["config"],
    )

"""Round checkpoints: everything needed to continue a run from its last round.

A checkpoint holds the aggregator's cross-round state, the base-update log, the
round counter, the client-sampling RNG state, the run's privacy accounts (central
DP's user-level ε history) and the run config with its hash. It
is one ``.npz`` file (arrays plus a JSON header; no pickle), written to a temporary
name and renamed, then referenced from the database in the same transaction as the
round's rows. A crash between the two leaves an unreferenced file that the redone
round overwrites; the database only ever points at complete checkpoints, and the
file's sha256 is checked on load.

Each run writes into its own directory under the checkpoint root, named by the run's
id *and* its uuid: every database numbers its runs from 1, so two databases sharing a
root (the default one, ``<cwd>/runs/checkpoints``) would otherwise write the same
files. A pruned checkpoint is deleted only while it still holds the bytes its run
recorded, so pruning never deletes a file that another run has since written.

What is deliberately *not* saved: what the server believes each node holds. After a
restart the nodes are new processes (and Flower gives them new ids), so every node
is asked again and sent the whole base-update log.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aggregation.base import Tensors
from aggregation.serialize import from_tree, to_tree

# Keys that may legitimately differ between a run and its resumption.
VOLATILE_KEYS = frozenset({"resume-run-id", "db-url", "round-timeout", "checkpoint-dir", "keep-checkpoints",
                           "mlflow-uri"})  # where the run is also tracked is no part of the experiment


def _with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A run config with every key it lacks at its default: a run recorded before a key
    existed ran with that key's default behaviour, so it is the same experiment as a run
    that states the default (and resuming it is not refused over a key it never knew)."""
    from core.config import RunConfig

    return {**RunConfig().to_flower(), **config}


def config_hash(config: dict[str, Any]) -> str:
    stable = {k: v for k, v in sorted(_with_defaults(config).items()) if k not in VOLATILE_KEYS}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Checkpoint:
    round: int
    aggregator: str
    state: Any
    merge_log: list[tuple[int, Tensors]]
    rng_state: dict[str, Any]
    config: dict[str, Any]
    # the run's privacy accounts, e.g. {"central": CentralAccount.to_json()}: a resume continues them
    privacy: dict[str, Any] = field(default_factory=dict)

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names its path.

    A ValueError, like every other refusal of bad input: the CLI prints it as one line.
    """


def config_differences(recorded: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """The keys (volatile ones aside) on which two run configs differ, sorted."""
    recorded, requested = _with_defaults(recorded), _with_defaults(requested)
    return sorted(k for k in set(recorded) | set(requested)
                  if k not in VOLATILE_KEYS and recorded.get(k) != requested.get(k))


def describe_differences(recorded: dict[str, Any], requested: dict[str, Any]) -> str:
    """'key: old -> new, ...' for every key of ``config_differences``."""
    return ", ".join(f"{k}: {recorded.get(k)!r} -> {requested.get(k)!r}"
                     for k in config_differences(recorded, requested))


def check_resumable(checkpoint: Checkpoint, config: dict[str, Any], *, run_id: int, path: Path, source: str) -> None:
    """Refuse to continue a checkpoint under a config other than the one it was written with.

    The rounds so far ran with the checkpoint's config; continuing under another (an
    edited ``runs`` row, another submission) would record one run that is two, or
    crash after clients have trained (another aggregator's state).
    """
    if config_hash(config) == checkpoint.config_hash:
        return
    raise ValueError(
        f"cannot resume run {run_id}: {source} differs from the config that checkpoint {path} "
        f"(round {checkpoint.round}) was written with ({describe_differences(checkpoint.config, config)})"
    )


def run_directory(root: Path, *, run_id: int, run_uuid: str | None) -> Path:
    """Where a run's checkpoints live under ``root`` (see the module docstring)."""
    # runs recorded before the uuid existed keep the directory they already wrote to
    return root / (f"run-{run_id}-{run_uuid}" if run_uuid else f"run-{run_id}")


def save(checkpoint: Checkpoint, directory: Path) -> tuple[Path, str]:
    """Write atomically into ``directory`` (a ``run_directory``); returns (path, sha256)."""
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
        "privacy": checkpoint.privacy,
    }
    names = {f"a{i}": key for i, key in enumerate(arrays)}
    header["arrays"] = names
    buffer = io.BytesIO()
    np.savez(buffer, __header__=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
             **{short: arrays[key] for short, key in names.items()})
    data = buffer.getvalue()
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
    try:
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
            privacy=header.get("privacy", {}),  # absent in checkpoints written before it was kept
        )
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        # only reachable without a recorded sha256, or for a file written by another version
        raise CheckpointError(f"checkpoint {path} is not a readable fedlora checkpoint "
                              f"({type(exc).__name__}: {exc})") from None


def discard(path: Path, sha256: str) -> bool:
    """Delete a pruned checkpoint, unless it no longer holds the bytes its run recorded.

    A file with other bytes was rewritten by another run (e.g. one recorded in another
    database before run directories were keyed by uuid): it is that run's, so it stays.
    Returns whether the file was deleted.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return False
    if hashlib.sha256(data).hexdigest() != sha256:
        return False
    path.unlink(missing_ok=True)
    return True

"""Take a run's result away: a PEFT LoRA adapter, or the merged model.

The global model of a run is ``W0 + (base updates, in round order) + global adapter``,
all read from the run's last checkpoint. Three ways out:

* exact adapter: when nothing was folded into the base (FedAvg, FFA-LoRA, Fed-SB,
  LoRA-FAIR, ...), the global adapter *is* a LoRA adapter: written with
  ``lora_alpha = r`` (scaling 1) and the folded factors as they are. Fed-SB's
  ``B R A`` is exported as the standard pair ``(B R, A)``.
* truncated adapter: FLoRA and FedEx-LoRA fold their updates into the base, so the
  accumulated update has grown to the sum of all ranks. It is re-factored by a
  truncated SVD at a chosen rank; the relative approximation error is printed
  (and is exactly the Eckart-Young tail of the singular values).
* ``--merged``: the base model with everything folded in, saved with
  ``save_pretrained`` (no approximation).

``PeftModel.from_pretrained(base, DIR)`` loads the adapter. The output directory must
be empty or new: files already there are kept unless ``--force`` lets the export write
over them.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from sqlalchemy.orm import Session

import aggregation
from aggregation.base import Tensors
from aggregation.linalg import stack_lowrank
from aggregation.lowrank import lowrank_svd
from core.model import fold_into_base, target_modules
from core.presets import load_base
from server import checkpoint as ckpt
from server.db.models import Run
from server.db.session import open_database
from server.recording import latest_checkpoint_row


@dataclass(frozen=True)
class ExportResult:
    path: Path
    kind: str  # "adapter" | "merged"
    rank: int | None
    relative_error: float  # ||exported - accumulated||_F / ||accumulated||_F (0 when exact)


def latest_checkpoint(db_url: str, run_id: int) -> tuple[Run, ckpt.Checkpoint]:
    with Session(open_database(db_url, create=False, write=False)) as session:
        run = session.get(Run, run_id)
        if run is None:
            raise ValueError(f"run {run_id} is not in the database")
        row = latest_checkpoint_row(session, run_id)
        if row is None:
            raise ValueError(f"run {run_id} has no checkpoint yet (no round finished)")
        session.expunge(run)
        return run, ckpt.load(Path(row.path), row.sha256)


def accumulated_pairs(checkpoint: ckpt.Checkpoint) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Per module, every low-rank piece of the update: base updates, then the adapter."""
    delta = aggregation.create(checkpoint.aggregator).global_delta(checkpoint.state)
    pieces: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for _, update in checkpoint.merge_log:
        for name, f in update.items():
            pieces.setdefault(name, []).append((f["B"], f["A"]))
    for name, f in delta.items():
        if f["B"].shape[1] > 0:
            pieces.setdefault(name, []).append((f["B"], f["A"]))
    return pieces


def platform_model(base_model: torch.nn.Module, checkpoint: ckpt.Checkpoint) -> torch.nn.Module:
    """The run's global model exactly as the server evaluates it."""
    model = copy.deepcopy(base_model)
    fold_into_base(model, [u for _, u in checkpoint.merge_log])
    delta = aggregation.create(checkpoint.aggregator).global_delta(checkpoint.state)
    fold_into_base(model, [delta])
    return model


def truncated_adapter(
    pieces: dict[str, list[tuple[np.ndarray, np.ndarray]]], rank: int | None
) -> tuple[Tensors, float]:
    """Folded {"B", "A"} per module at ``rank`` (None: exact, the stacked rank) + error."""
    out: Tensors = {}
    err_sq = total_sq = 0.0
    for name, pairs in sorted(pieces.items()):
        stacked = stack_lowrank(pairs)
        if rank is None and len(pairs) == 1:
            out[name] = {"B": stacked["B"], "A": stacked["A"]}
            continue
        u, s, vt = lowrank_svd(stacked["B"], stacked["A"])
        k = min(rank or len(s), len(s))
        out[name] = {"B": u[:, :k] * s[:k], "A": vt[:k]}
        err_sq += float(np.sum(s[k:] ** 2))
        total_sq += float(np.sum(s**2))
    return out, (float(np.sqrt(err_sq / total_sq)) if total_sq > 0 else 0.0)


def write_peft_adapter(base_model: torch.nn.Module, factors: Tensors, targets: tuple[str, ...], out: Path,
                       *, base_name: str) -> int:
    """Save factors (scaling folded into B) as a PEFT LoRA adapter with alpha = r."""
    rank = max(f["B"].shape[1] for f in factors.values())
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), lora_dropout=0.0)
    model = get_peft_model(copy.deepcopy(base_model), config)
    wrapped = dict(model.base_model.model.named_modules())
    with torch.no_grad():
        for name in target_modules(base_model, targets):
            layer = wrapped[name]
            a = np.zeros((rank, layer.lora_A["default"].in_features), np.float32)
            b = np.zeros((layer.lora_B["default"].out_features, rank), np.float32)
            if name in factors:  # modules with no update keep a zero adapter
                q = factors[name]["B"].shape[1]
                a[:q], b[:, :q] = factors[name]["A"], factors[name]["B"]
            layer.lora_A["default"].weight.copy_(torch.from_numpy(a))
            layer.lora_B["default"].weight.copy_(torch.from_numpy(b))
    model.peft_config["default"].base_model_name_or_path = base_name
    model.save_pretrained(out)
    return rank


def check_output_directory(out: Path, *, force: bool) -> None:
    """Refuse (before anything is loaded) to write into a file or a non-empty directory unless ``force``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    if out.is_dir() and not force and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty; choose a new or empty directory, "
                         "or pass --force to write over the files there")


def export_run(db_url: str, run_id: int, out: Path, *, rank: int | None = None, merged: bool = False,
               force: bool = False) -> ExportResult:
    check_output_directory(out, force=force)
    run, checkpoint = latest_checkpoint(db_url, run_id)
    config = checkpoint.config
    base = load_base(str(config["model"]))
    out.mkdir(parents=True, exist_ok=True)
    if merged:
        model = platform_model(base.model, checkpoint)
        model.save_pretrained(out)
        base.tokenizer.save_pretrained(out)
        result = ExportResult(path=out, kind="merged", rank=None, relative_error=0.0)
    else:
        if rank is not None and rank < 1:
            raise ValueError(f"--rank must be >= 1, got {rank}")
        factors, error = truncated_adapter(accumulated_pairs(checkpoint), rank)
        if not factors:
            raise ValueError(f"run {run_id}: the global update is zero; nothing to export")
        targets = tuple(t.strip() for t in str(config["target-modules"]).split(",") if t.strip())
        used = write_peft_adapter(base.model, factors, targets, out, base_name=str(config["model"]))
        result = ExportResult(path=out, kind="adapter", rank=used, relative_error=error)
    (out / "fedlora_export.json").write_text(json.dumps(
        {"run_id": run_id, "round": checkpoint.round, "aggregator": checkpoint.aggregator, "kind": result.kind,
         "rank": result.rank, "relative_error": result.relative_error, "model": config["model"]}, indent=2))
    return result

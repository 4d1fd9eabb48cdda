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

The adapter is written at the rank its weights use (exactly-zero components dropped),
names its base by hub id where the preset knows it (else a local path), carries the
tokenizer and a model card (``README.md``: run, aggregator, rounds, clients, ε), so
``AutoPeftModelForCausalLM.from_pretrained(DIR)`` loads it. The output directory must
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
from core.presets import BaseModel, load_base, preset_names
from server import checkpoint as ckpt
from server.db.models import Run
from server.db.session import open_database
from server.model_card import model_card, read_provenance
from server.recording import latest_checkpoint_row


@dataclass(frozen=True)
class ExportResult:
    path: Path
    kind: str  # "adapter" | "merged"
    rank: int | None
    relative_error: float  # ||exported - accumulated||_F / ||accumulated||_F (0 when exact)
    base_model: str  # base_model_name_or_path: a hub id or a local directory


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


def used_components(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Indices j whose rank-one term ``B[:, j] A[j]`` is not exactly zero.

    A run at ``max-rank`` 64 over clients of ranks 4/8/16 holds 64 components, but the
    ones no client ever held keep B's zero init (FedAvg's holder mean leaves them as they
    were): B @ A has no term there. Dropping exactly-zero terms is exact, so the adapter is
    written at the rank its weights use (16 there, not 64), at no approximation.
    """
    return np.flatnonzero(np.any(b != 0, axis=0) & np.any(a != 0, axis=1))


def numerical_rank(s: np.ndarray, shape: tuple[int, int]) -> int:
    """Singular values above numpy's ``matrix_rank`` tolerance (s_max * max(m, n) * eps)."""
    if len(s) == 0 or s[0] == 0:
        return 0
    return int(np.sum(s > s[0] * max(shape) * np.finfo(np.float64).eps))


def truncated_adapter(
    pieces: dict[str, list[tuple[np.ndarray, np.ndarray]]], rank: int | None
) -> tuple[Tensors, float]:
    """Folded {"B", "A"} per module at ``rank`` (None: exact, the rank used) + error.

    Modules whose update is zero are left out (the adapter keeps zeros there).
    """
    out: Tensors = {}
    err_sq = total_sq = 0.0
    for name, pairs in sorted(pieces.items()):
        stacked = stack_lowrank(pairs)
        if rank is None and len(pairs) == 1:
            used = used_components(stacked["B"], stacked["A"])
            if len(used):
                out[name] = {"B": stacked["B"][:, used], "A": stacked["A"][used]}
            continue
        u, s, vt = lowrank_svd(stacked["B"], stacked["A"])
        # beyond the numerical rank the singular values are rounding noise: not written
        k = min(rank or len(s), numerical_rank(s, (u.shape[0], vt.shape[1])))
        if k:
            out[name] = {"B": u[:, :k] * s[:k], "A": vt[:k]}
        err_sq += float(np.sum(s[k:] ** 2))
        total_sq += float(np.sum(s**2))
    return out, (float(np.sqrt(err_sq / total_sq)) if total_sq > 0 else 0.0)


def write_peft_adapter(base_model: torch.nn.Module, factors: Tensors, targets: tuple[str, ...], out: Path,
                       *, base_name: str) -> int:
    """Save factors (scaling folded into B) as a PEFT LoRA adapter with alpha = r.

    One ``r`` for every module, the largest any module uses: a module using fewer is
    zero-padded to it (exact), which every PEFT version reads, unlike ``rank_pattern``.
    """
    rank = max(f["B"].shape[1] for f in factors.values())
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), lora_dropout=0.0,
                        task_type="CAUSAL_LM")  # AutoPeftModelForCausalLM reads the task type
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
    # no embedding layers are adapted; "auto" would ask the hub for the base's config.json
    model.save_pretrained(out, save_embedding_layers=False)
    return rank


def check_output_directory(out: Path, *, force: bool) -> None:
    """Refuse (before anything is loaded) to write into a file or a non-empty directory unless ``force``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    if out.is_dir() and not force and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty; choose a new or empty directory, "
                         "or pass --force to write over the files there")


def base_reference(base: BaseModel, out: Path) -> str:
    """``base_model_name_or_path``: what ``AutoPeftModelForCausalLM`` loads the base from.

    The hub id where the preset knows one (SmolLM2), else the directory the weights came
    from, else the hub id they were loaded by. A preset built in memory (``tiny``) is on
    no hub and in no directory: it is saved into the export (``base-model/``), so the
    export still loads by name.
    """
    if base.hub_id:
        return base.hub_id
    if base.path is not None:
        return str(base.path)
    if base.name not in preset_names():
        return base.name
    target = out / "base-model"
    base.model.save_pretrained(target)
    base.tokenizer.save_pretrained(target)
    return str(target.resolve())


def hub_note(base: BaseModel) -> str:
    """The caveat a card needs when the hub's weights are not bit-for-bit the trained-on base."""
    if not (base.hub_id and base.path):
        return ""
    return (f"The run trained on a local copy of `{base.hub_id}` (`{base.path}`; for SmolLM2 the packaged "
            "Q4_1 GGUF, dequantised), so on the hub's full-precision weights the adapter is applied to a "
            "slightly different base. For the platform's model exactly: "
            f"`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"{base.path}\"), DIR)`.")


def export_run(db_url: str, run_id: int, out: Path, *, rank: int | None = None, merged: bool = False,
               force: bool = False) -> ExportResult:
    check_output_directory(out, force=force)
    if rank is not None and rank < 1:
        raise ValueError(f"--rank must be >= 1, got {rank}")
    _, checkpoint = latest_checkpoint(db_url, run_id)
    config = checkpoint.config
    base = load_base(str(config["model"]))
    out.mkdir(parents=True, exist_ok=True)
    if merged:
        model = platform_model(base.model, checkpoint)
        model.save_pretrained(out)
        base_ref = base.hub_id or str(base.path or base.name)  # the card's base_model: nothing to load it by
        result = ExportResult(path=out, kind="merged", rank=None, relative_error=0.0, base_model=base_ref)
    else:
        factors, error = truncated_adapter(accumulated_pairs(checkpoint), rank)
        if not factors:
            raise ValueError(f"run {run_id}: the global update is zero; nothing to export")
        targets = tuple(t.strip() for t in str(config["target-modules"]).split(",") if t.strip())
        base_ref = base_reference(base, out)
        used = write_peft_adapter(base.model, factors, targets, out, base_name=base_ref)
        result = ExportResult(path=out, kind="adapter", rank=used, relative_error=error, base_model=base_ref)
    # the tokenizer beside the weights: AutoTokenizer.from_pretrained(DIR) works, and
    # AutoPeftModelForCausalLM finds it here instead of asking the hub for one
    base.tokenizer.save_pretrained(out)
    provenance = read_provenance(db_url, run_id, checkpoint.round, config)
    # after save_pretrained, which writes PEFT's own placeholder README.md
    (out / "README.md").write_text(model_card(provenance, kind=result.kind, base_ref=base_ref, base_label=base.label,
                                              rank=result.rank, relative_error=result.relative_error,
                                              hub_note=hub_note(base)), encoding="utf-8")
    (out / "fedlora_export.json").write_text(json.dumps(
        {"run_id": run_id, "round": checkpoint.round, "aggregator": checkpoint.aggregator, "kind": result.kind,
         "rank": result.rank, "relative_error": result.relative_error, "model": config["model"],
         "base_model_name_or_path": result.base_model}, indent=2))
    return result

"""``fedlora export RUN --node NAME``: one node's personalised adapter (FedSA-LoRA).

A personalised method keeps part of every client's adapter on its node (FedSA-LoRA's B,
``client.personal``): the server holds the shared part (A, in the run's checkpoint) and
the node holds its own, in ``<cache>/personal/<run tag>/<node>.npz`` (``core.personal``).
So this export runs where both can be read: the node's machine with access to the run's
database and checkpoints (in simulation, the one machine), or anywhere the node's file
has been copied to (``--personal-dir``). B itself never travels over Flower.

The adapter is the node's as the method defines it: its personal factors in place of
what the server would send it (``downlink`` at its rank, then ``client_delta``), for
FedSA-LoRA ``s_k B_k A[:r_k]`` with the shared A of the run's last checkpoint (the A
the node would start its next round from) and the B it kept after its last round. It is
written like the global export (``server.export``): a PEFT LoRA adapter with
``lora_alpha = r`` and the scale folded into B, exact, with the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import aggregation
from aggregation.base import ClientInfo, ClientUpdate
from core.personal import PersonalStore, default_directory
from core.presets import load_base
from server.export import (
    ExportResult,
    base_reference,
    check_output_directory,
    hub_note,
    latest_checkpoint,
    write_peft_adapter,
)


def export_personal(db_url: str, run_id: int, node: str, out: Path, *, directory: Path | None = None,
                    force: bool = False) -> ExportResult:
    check_output_directory(out, force=force)
    run, checkpoint = latest_checkpoint(db_url, run_id)
    agg = aggregation.create(checkpoint.aggregator)
    run_key = run.tag or str(checkpoint.config.get("run-tag") or "")
    if not run_key:
        raise ValueError(f"run {run_id} has no run tag, so its nodes' personal factors cannot be found")
    store = PersonalStore(directory=directory or default_directory(), run_key=run_key, node=node)
    kept = store.load()
    if kept is None:
        raise ValueError(f"no personal factors of node {node!r} for run {run_id} at {store.path}: "
                         f"only {checkpoint.aggregator!r} nodes that trained keep them, on their own machine "
                         "(copy the file and pass --personal-dir)")
    info = ClientInfo(node_id=node, rank=kept.rank, alpha=kept.alpha)
    sent = agg.downlink(checkpoint.state, info)
    if not sent.personal(agg.uplink):
        raise ValueError(f"{checkpoint.aggregator!r} keeps nothing on the nodes; export the global model instead")
    tensors = {m: {**sent.adapter.get(m, {}), **kept.tensors.get(m, {})} for m in sent.adapter}
    update = ClientUpdate(node_id=node, num_examples=1, rank=kept.rank, alpha=kept.alpha, tensors=tensors)
    factors = agg.client_delta(checkpoint.state, update)
    config = checkpoint.config
    base = load_base(str(config["model"]))
    out.mkdir(parents=True, exist_ok=True)
    targets = tuple(t.strip() for t in str(config["target-modules"]).split(",") if t.strip())
    base_ref = base_reference(base, out)
    rank = write_peft_adapter(base.model, factors, targets, out, base_name=base_ref)
    base.tokenizer.save_pretrained(out)
    (out / "README.md").write_text(
        f"# Personalised adapter of node `{node}`, fedlora run {run_id}\n\n"
        f"Aggregator `{checkpoint.aggregator}`: the shared factors from the server's checkpoint of round "
        f"{checkpoint.round}, the node's own (trained in its round {kept.server_round}, rank {kept.rank}, "
        f"lora_alpha {kept.alpha:g}) from `{store.path}`. LoRA rank {rank}, lora_alpha = r (the scale is "
        f"folded into B). Base model: `{base_ref}`.\n\n{hub_note(base)}\n", encoding="utf-8")
    (out / "fedlora_export.json").write_text(json.dumps(
        {"run_id": run_id, "round": checkpoint.round, "aggregator": checkpoint.aggregator, "kind": "personal adapter",
         "node": node, "node_round": kept.server_round, "rank": rank, "model": config["model"],
         "base_model_name_or_path": base_ref}, indent=2))
    return ExportResult(path=out, kind="adapter", rank=rank, relative_error=0.0, base_model=base_ref)

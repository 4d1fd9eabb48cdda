"""The model card (``README.md``) of an export: which run made it, and how to load it.

The card is what a Hugging Face user reads first: YAML front matter the hub understands
(``base_model``, ``library_name``, ``tags``), then the run, aggregator, rounds, clients
and privacy (ε) that produced the weights, and the two lines that load them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from server.db import read
from server.db.models import Run
from server.db.session import open_database


@dataclass(frozen=True, kw_only=True)
class Provenance:
    """What the round log says about the run behind an export."""

    run_id: int
    uuid: str | None
    tag: str | None
    status: str
    aggregator: str
    config: dict[str, Any]
    round: int  # the checkpoint's round: what the export holds
    clients: int  # distinct nodes whose update was aggregated up to that round
    sampled: int  # sampled-client slots up to that round (a node counts once per round)
    epsilon: read.EpsilonSummary | None  # local DP-SGD: the largest ε a client reported
    central_epsilon: float | None  # central DP: the user-level ε spent through the exported round


def read_provenance(db_url: str, run_id: int, round_number: int, config: dict[str, Any]) -> Provenance:
    """``config``: the checkpoint's, the one the exported rounds ran with."""
    with Session(open_database(db_url, create=False, write=False)) as session:
        run = session.get(Run, run_id)
        if run is None:
            raise ValueError(f"run {run_id} is not in the database")
        updates = [u for u in read.client_updates(session, run_id) if u.round_number <= round_number]
        central = read.central_epsilon_points(read.rounds(session, run_id))
        return Provenance(run_id=run.id, uuid=run.uuid, tag=run.tag, status=run.status, aggregator=run.aggregator,
                          config=dict(config), round=round_number,
                          clients=len({u.node_id for u in updates if u.status == "ok"}), sampled=len(updates),
                          epsilon=read.epsilon_summary(updates),
                          central_epsilon=next((eps for number, eps in reversed(central) if number <= round_number),
                                               None))


def privacy_line(p: Provenance) -> str:
    parts = []
    if p.epsilon is not None:
        parts.append(f"local DP-SGD: ε ≤ {p.epsilon.epsilon:.3f} at δ = {p.epsilon.delta:g} "
                     f"(the largest of {p.epsilon.clients} clients' ε)")
    if float(p.config.get("dp-central-noise", 0) or 0) > 0:
        spent = ("" if p.central_epsilon is None else
                 f"user-level ε = {p.central_epsilon:.3f} at δ = {p.config.get('dp-delta', '?')} through round "
                 f"{p.round}, ")
        parts.append(f"central DP: {spent}updates clipped to {p.config.get('dp-central-clip')}, "
                     f"noise multiplier {p.config.get('dp-central-noise')}")
    return "; ".join(parts) or "none: no differential privacy in this run (ε = ∞)"


#: card row -> (run-config keys it shows, how); a row whose keys the config lacks is left out
_CONFIG_ROWS: dict[str, tuple[tuple[str, ...], str]] = {
    "target modules": (("target-modules",), "`{}`"),
    "client ranks": (("ranks", "max-rank"), "`{}`, max-rank {}"),
    "local training": (("local-steps", "learning-rate", "batch-size"), "{} steps per round, lr {}, batch {}"),
    "data": (("data", "partition", "seed"), "`{}`, partitioned `{}`, seed {}"),
}


def _config_rows(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    return [(label, form.format(*(cfg[k] for k in keys)))
            for label, (keys, form) in _CONFIG_ROWS.items() if all(k in cfg for k in keys)]


def model_card(p: Provenance, *, kind: str, base_ref: str, base_label: str, rank: int | None,
               relative_error: float, hub_note: str = "") -> str:
    """Markdown with hub front matter; ``kind`` is "adapter" or "merged"."""
    cfg = p.config
    options = f" (`{cfg['aggregator-options']}`)" if cfg.get("aggregator-options") else ""
    what = (f"a LoRA adapter at rank {rank} (lora_alpha = r: scaling 1)" if kind == "adapter"
            else "the base model with the run's update merged in")
    error = "exact" if relative_error == 0 else f"{relative_error:.6f} (truncated SVD at rank {rank})"
    load = ("from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            "model = AutoPeftModelForCausalLM.from_pretrained(DIR)" if kind == "adapter" else
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            "model = AutoModelForCausalLM.from_pretrained(DIR)")
    front = ["---", f"base_model: {base_ref}"] + (["library_name: peft"] if kind == "adapter" else []) + [
        "tags:", "- fedlora", "- federated-learning", "- lora", "---"]
    rows = [
        ("run", f"{p.run_id}" + (f" (uuid `{p.uuid}`)" if p.uuid else "") + (f", tag `{p.tag}`" if p.tag else "")
         + f", {p.status}"),
        ("aggregator", f"{p.aggregator}{options}"),
        ("rounds", f"{p.round} of {cfg.get('num-server-rounds', '?')} (the checkpoint of round {p.round})"),
        ("clients", f"{p.clients} distinct nodes aggregated; {cfg.get('clients-per-round', '?')} sampled per round "
                    f"({p.sampled} sampled in all)"),
        ("base model", f"`{base_ref}` ({base_label})"),
        ("weights", what),
        ("approximation", error),
        *_config_rows(cfg),
        ("differential privacy", privacy_line(p)),
    ]
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    return "\n".join(front + [
        "", f"# fedlora run {p.run_id}: {p.aggregator}, {kind}", "",
        "Produced by fedlora (federated LoRA fine-tuning on Flower) from the run below.", "", table, "",
        "## Load", "", "```python", load, "tokenizer = AutoTokenizer.from_pretrained(DIR)", "```", "",
        *([hub_note, ""] if hub_note else []),
    ])

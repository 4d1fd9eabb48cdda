"""Side-by-side quality of every aggregator on one federated task.

    python -m simulations.bench_quality [--quick] [--out DIR] [--aggregators a,b] [--dp-epsilon E]

Each aggregator runs the same task on Flower's simulation engine (Dirichlet non-IID
split, heterogeneous ranks, same seed), next to two references computed in-process:
the *ceiling*, centralised LoRA on the pooled training data for the same total number
of optimiser steps at the largest rank, and the *floor*, the base model untouched.
Writes ``quality.md``, ``quality.csv`` and ``quality.png`` (held-out perplexity per
round) to ``--out``. With ``--dp-epsilon`` it compares the aggregators whose aggregate
is a sum (FedAvg, FFA-LoRA, Fed-SB) under per-client DP-SGD at that epsilon.

The default size (SmolLM2-135M) takes about 20 minutes on 2 CPU cores; ``--quick``
uses the tiny smoke-test model and exists so the test suite can run the whole path.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

import aggregation
from core.data import load_examples, partition, split_heldout
from core.model import AdaptedModel, AdapterSpec
from core.presets import load_base
from core.trainer import TrainConfig, evaluate, train
from cli.app import main as cli_main
from core.config import parse_ranks
from server.db.models import Run
from server.db.session import open_database
from server.report import load_series

DEFAULT = dict(model="smollm2", num_clients=6, clients_per_round=3, rounds=3, local_steps=3, ranks="4,8,16",
               max_rank=16, lr=1e-3, eval_examples=48, max_seq_len=64, partition="dirichlet:0.5", batch_size=8)
QUICK = dict(model="tiny", num_clients=3, clients_per_round=3, rounds=2, local_steps=2, ranks="2,4,8",
             max_rank=8, lr=0.05, eval_examples=8, max_seq_len=48, partition="dirichlet:0.5", batch_size=4)
# the methods whose aggregate is a weighted sum (the capability their classes declare)
DP_AGGREGATORS = tuple(aggregation.weighted_sum_names())


@dataclass(frozen=True)
class Row:
    name: str
    final_ppl: float
    best_round: int | None
    mb_down: float
    mb_up: float
    wall_s: float
    status: str
    curve: tuple[tuple[int, float], ...]


def run_aggregator(name: str, size: dict, out: Path, seed: int, extra: list[str]) -> Row:
    db = f"sqlite:///{out / 'quality.db'}"
    args = ["simulate", "--aggregator", name, "--model", size["model"], "--num-clients", str(size["num_clients"]),
            "--clients-per-round", str(size["clients_per_round"]), "--rounds", str(size["rounds"]),
            "--local-steps", str(size["local_steps"]), "--ranks", size["ranks"], "--max-rank", str(size["max_rank"]),
            "--lr", str(size["lr"]), "--eval-examples", str(size["eval_examples"]),
            "--max-seq-len", str(size["max_seq_len"]), "--partition", size["partition"],
            "--batch-size", str(size["batch_size"]), "--seed", str(seed), "--db", db,
            "--home", str(out / "flwr"), "--checkpoint-dir", str(out / "checkpoints"), *extra]
    start = time.monotonic()
    code = cli_main(args)
    wall = time.monotonic() - start
    with Session(open_database(db)) as session:
        run_id = session.scalars(select(Run.id).where(Run.aggregator == name).order_by(Run.id.desc())).first()
        if run_id is None:
            return Row(name, math.nan, None, 0.0, 0.0, wall, f"failed (exit {code})", ())
        s = load_series(session, run_id)
    return Row(name, s.eval_ppl[-1] if s.eval_ppl else math.nan, s.best_round, sum(s.mb_down), sum(s.mb_up),
               wall, s.status, tuple(zip(s.eval_rounds, s.eval_ppl)))


def references(size: dict, seed: int, *, private_run: bool = False) -> tuple[Row, Row]:
    """(centralised ceiling, base-model floor), evaluated on the same held-out rows.

    The ceiling is trained without DP even when the federated runs use it (``private_run``
    only labels it so): it shows what the privacy costs, not a private baseline.
    """
    start = time.monotonic()
    base = load_base(size["model"])
    train_rows, heldout = split_heldout(load_examples("chatterbot"), 0.1, seed)
    heldout = heldout[: size["eval_examples"]]
    floor = evaluate(base.model, heldout, base.tokenizer, max_len=size["max_seq_len"]).perplexity
    floor_row = Row("base model (floor)", floor, 0, 0.0, 0.0, time.monotonic() - start, "reference",
                    tuple((r, floor) for r in range(size["rounds"] + 1)))
    # same examples the clients hold, pooled; same optimiser steps per "round" as the federation
    pooled = [ex for part in partition(train_rows, size["partition"], size["num_clients"], seed) for ex in part]
    rank = max(parse_ranks(size["ranks"]))
    torch.manual_seed(seed)  # before the adapter exists: its A is drawn from this RNG
    adapted = AdaptedModel(copy.deepcopy(base.model),
                           AdapterSpec(kind="lora", rank=rank, alpha=16.0, targets=("q_proj", "v_proj")))
    adapted.set_trainable(frozenset({"A", "B"}))
    curve = [(0, floor)]
    start = time.monotonic()
    for r in range(1, size["rounds"] + 1):
        steps = size["clients_per_round"] * size["local_steps"]
        train(adapted, pooled, base.tokenizer, TrainConfig(steps=steps, batch_size=size["batch_size"],
                                                            learning_rate=size["lr"], max_len=size["max_seq_len"],
                                                            seed=seed + r))
        curve.append((r, evaluate(adapted.model, heldout, base.tokenizer, max_len=size["max_seq_len"]).perplexity))
    best = min(curve[1:], key=lambda c: c[1])[0]
    label = "centralised LoRA (ceiling, no DP)" if private_run else "centralised LoRA (ceiling)"
    ceiling = Row(label, curve[-1][1], best, 0.0, 0.0, time.monotonic() - start,
                  "reference", tuple(curve))
    return ceiling, floor_row


def write_outputs(rows: list[Row], out: Path, title: str) -> Path:
    headers = ["method", "final eval ppl", "best round", "MB down", "MB up", "wall s", "status", "ppl by round"]
    table = [[r.name, f"{r.final_ppl:.3f}", "-" if r.best_round is None else str(r.best_round),
              f"{r.mb_down:.2f}", f"{r.mb_up:.2f}", f"{r.wall_s:.1f}", r.status,
              " → ".join(f"{ppl:.1f}" for _, ppl in r.curve)] for r in rows]
    md = [f"# {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    md += ["| " + " | ".join(row) + " |" for row in table]
    (out / "quality.md").write_text("\n".join(md) + "\n")
    with open(out / "quality.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(headers)
        writer.writerows(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for r in rows:
        if r.curve:
            style = "--" if r.status == "reference" else "-"
            ax.plot([x for x, _ in r.curve], [y for _, y in r.curve], style, marker="o", markersize=3, label=r.name)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("held-out answer perplexity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "quality.png")
    plt.close(fig)
    return out / "quality.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 rounds: for the test suite")
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--aggregators", default="", help="comma list (default: all, or the DP set with --dp-epsilon)")
    parser.add_argument("--dp-epsilon", type=float, default=0.0, help="compare FedAvg, FFA-LoRA, Fed-SB under DP")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    size = QUICK if args.quick else DEFAULT
    names = [n for n in args.aggregators.split(",") if n] or (
        list(DP_AGGREGATORS) if args.dp_epsilon else aggregation.names())
    for name in names:
        aggregation.get_class(name)  # unknown names fail before anything runs
    args.out.mkdir(parents=True, exist_ok=True)
    def extra(name: str) -> list[str]:
        # each method gets its own privacy ledger: they must not spend each other's budget
        if not args.dp_epsilon:
            return []
        return ["--dp-epsilon", str(args.dp_epsilon), "--dp-state-dir", str(args.out / "dp-state" / name)]

    rows = [run_aggregator(name, size, args.out, args.seed, extra(name)) for name in names]
    rows += list(references(size, args.seed, private_run=bool(args.dp_epsilon)))
    title = f"{size['model']}: {size['num_clients']} clients, {size['partition']}, ranks {size['ranks']}" + (
        f", DP eps={args.dp_epsilon}" if args.dp_epsilon else "")
    path = write_outputs(rows, args.out, title)
    print(path.read_text())
    print(f"CSV: {args.out / 'quality.csv'}  plot: {args.out / 'quality.png'}")
    return 0 if all(r.status in ("completed", "reference") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

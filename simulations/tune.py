"""Tune each aggregator's local learning rate on a validation split of the clients' training data.

    python -m simulations.tune [--methods a,b] [--grid 1e-3,3e-3] [--rounds N] [--write simulations/tuning]

The held-out evaluation set is never looked at: the sweep's data is the chatterbot
training split with the rows held out under *any* benchmark seed removed
(``validation_pool``), written to a JSONL file; each run is an ordinary ``fedlora
simulate`` on that file, so the server's "held-out" examples are a validation split
carved from training rows. Each method sweeps its grid (``--grid``, else the grid for its
adapter kind: Fed-SB trains only the r x r matrix R, which its papers train at a far
larger rate than LoRA's A and B), and the rate with the lowest final validation perplexity
is chosen. Writes ``<write>.json`` (merged: a partial sweep updates only its methods) and
``<write>.md``, the table with the size, the command and each paper's own setting
(``aggregation.recommended(name).paper``) next to ours. The chosen values are then copied
into each class's ``recommended`` (the test suite checks they agree).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import aggregation
from core.data import Example, load_examples, split_heldout
from simulations.bench_quality import DEFAULT, QUICK, SCENARIOS, QUICK_SCENARIOS, Size, run_one, simulate_args

#: the seeds bench_quality evaluates on: none of their held-out rows may be tuned on
BENCH_SEEDS = (0, 1, 2)
EVAL_FRACTION = 0.1  # the run config's eval-fraction default, as the benchmark uses it
#: the sweep per adapter kind (a class attribute): LoRA's A and B; Fed-SB's R between frozen factors
#: (the 2026-12-01 sweep's union: every LoRA method's best lay inside it but FLoRA's and
#: LoRA-FAIR's, whose 2.5e-2 diverged; see tuning.md)
GRIDS = {"lora": (5e-4, 1.5e-3, 4e-3, 1e-2), "bra": (3e-3, 1e-2, 3e-2, 1e-1)}
#: Fed-SB's init step (sb-init-lr) during its sweep: held at LoRA's usual rate, so the sweep moves
#: R's rate alone (at lr 1e-2 the init's sign step had taken validation ppl 39.6 -> 636)
INIT_STEP = {"bra": 1e-3}
# the benchmark's own schedule, evaluated at round 0 and the last only
TUNE = replace(DEFAULT, eval_every=DEFAULT.rounds)


def validation_pool(examples: list[Example], seeds: tuple[int, ...] = BENCH_SEEDS) -> list[Example]:
    """The rows that are training data under every benchmark seed (held out under none)."""
    held = {ex for seed in seeds for ex in split_heldout(examples, EVAL_FRACTION, seed)[1]}
    return [ex for ex in examples if ex not in held]


def write_pool(rows: list[Example], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for ex in rows:
            fh.write(json.dumps({"instruction": ex.prompt, "output": ex.response, "category": ex.category}) + "\n")
    return path


def grid_for(name: str, override: tuple[float, ...]) -> tuple[float, ...]:
    return override or GRIDS[aggregation.get_class(name).adapter_kind]


def sweep(name: str, grid: tuple[float, ...], size: Size, *, ranks: str, seed: int, data: Path,
          out: Path, earlier: dict[str, float] | None = None) -> dict:
    """Final validation perplexity per learning rate; the lowest wins (NaN: the run failed).

    ``earlier``: points already measured at the same size, ranks and seed (a sweep widened
    past its edge keeps them, and the choice is over all of them).
    """
    results = dict(earlier or {})
    init_step = INIT_STEP.get(aggregation.get_class(name).adapter_kind, 0.0)
    flags = ["--sb-init-lr", str(init_step)] if init_step else []
    for lr in grid:
        if f"{lr:g}" in results:  # measured before at this size: not run again
            continue
        args = simulate_args(name, size, ranks=ranks, seed=seed, out=out, lr=lr, data=str(data)) + flags
        curve = run_one(name, args, out)
        results[f"{lr:g}"] = curve.points[-1][1] if curve.points else math.nan
        print(f"  {name} lr {lr:g}: validation ppl {results[f'{lr:g}']:.2f} ({curve.wall_s:.0f} s)", flush=True)
    results = {lr: results[lr] for lr in sorted(results, key=float)}
    finite = {lr: ppl for lr, ppl in results.items() if math.isfinite(ppl)}
    chosen = min(finite, key=finite.get) if finite else None
    swept = list(results)
    edge = chosen is not None and len(swept) > 1 and chosen in (swept[0], swept[-1])
    return {"grid": results, "chosen": None if chosen is None else float(chosen), "at_grid_edge": edge,
            "init_learning_rate": init_step, "size": size.describe(), "ranks": ranks, "seed": seed}


def write_table(results: dict, path: Path, command: str) -> None:
    lines = [f"# Tuned local learning rates ({results['date']})", "",
             "Validation perplexity after the sweep's last round, on a validation split carved from the clients' "
             "training data (rows held out under no benchmark seed); never the held-out evaluation set.", "",
             f"Reproduce: `{command}` (each row's own command is in the JSON file)", "",
             "| method | size | lr grid → validation ppl | chosen | at grid edge | paper's own setting |",
             "|---|---|---|---|---|---|"]
    for name, r in sorted(results["methods"].items()):
        grid = ", ".join(f"{lr}: {ppl:.1f}" for lr, ppl in r["grid"].items())
        paper = aggregation.recommended(name).paper if name in aggregation.names() else ""
        init = f" (sb-init-lr held at {r['init_learning_rate']:g})" if r.get("init_learning_rate") else ""
        lines.append(f"| {name} | {r['size']}, ranks {r['ranks']}, seed {r['seed']} | {grid}{init} | {r['chosen']} | "
                     f"{'yes: widen' if r['at_grid_edge'] else 'no'} | {paper or 'not recorded'} |")
    for note in results.get("notes", []):  # each its own paragraph
        lines += ["", note]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="", help="comma list (default: every registered aggregator)")
    parser.add_argument("--grid", default="", help="comma list of rates for every method (default: per kind)")
    parser.add_argument("--quick", action="store_true", help="tiny model: for the test suite")
    parser.add_argument("--rounds", type=int, default=0, help="override the sweep's rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/tuning"), help="scratch: databases, the data file")
    parser.add_argument("--write", type=Path, default=Path("simulations/tuning"), help="<write>.json and .md")
    args = parser.parse_args(argv)
    size = replace(QUICK, eval_every=QUICK.rounds) if args.quick else TUNE
    size = replace(size, rounds=args.rounds or size.rounds, eval_every=args.rounds or size.eval_every)
    ranks = (QUICK_SCENARIOS if args.quick else SCENARIOS)["mixed"]
    grid = tuple(float(x) for x in args.grid.split(",") if x)
    names = [n for n in args.methods.split(",") if n] or aggregation.names()
    for name in names:
        aggregation.get_class(name)  # unknown names fail before anything runs
    data = write_pool(validation_pool(load_examples("chatterbot")), args.out / "train-only.jsonl")
    json_path = args.write.with_suffix(".json")
    results = json.loads(json_path.read_text()) if json_path.exists() else {"methods": {}}
    command = "python -m simulations.tune " + shlex.join(argv if argv is not None else sys.argv[1:])
    results.update(date=datetime.date.today().isoformat(), command=command)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    for name in names:  # written after each method: an interrupted sweep keeps what it measured
        before = results["methods"].get(name, {})
        same = (before.get("size"), before.get("ranks"), before.get("seed")) == (size.describe(), ranks, args.seed)
        results["methods"][name] = {**sweep(name, grid_for(name, grid), size, ranks=ranks, seed=args.seed,
                                            data=data, out=args.out, earlier=before["grid"] if same else None),
                                    "command": command}
        print(f"{name}: {results['methods'][name]['grid']} -> {results['methods'][name]['chosen']}", flush=True)
        json_path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        write_table(results, args.write.with_suffix(".md"), command)
    print(args.write.with_suffix(".md").read_text())
    return 0 if all(results["methods"][n]["chosen"] is not None for n in names) else 1


if __name__ == "__main__":
    raise SystemExit(main())

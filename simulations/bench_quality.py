"""Side-by-side quality of every aggregator on one federated task, over several seeds.

    python -m simulations.bench_quality [--quick] [--out DIR] [--aggregators a,b] [--seeds 0,1,2]
                                        [--scenarios mixed,homogeneous] [--dp-epsilon 8,2] [--rounds N]

Each aggregator runs the same task on Flower's simulation engine (Dirichlet non-IID split)
at its own recommended learning rate (``aggregation.recommended``, from
``python -m simulations.tune``) in each *scenario* (``mixed``: client ranks 2/4/8/16;
``homogeneous``: every client at rank 8, the control, only for FedAvg, FLoRA,
LoRA-FAIR and Fed-SB, whose claims it checks) and for each seed (the run's
``seed``: client sampling, adapter initialisation, and with them the partition and the
held-out split). Next to them, per seed, two references computed in-process: the
*ceiling*, centralised LoRA on the pooled training data for the same total number of
optimiser steps at the scenario's largest rank, and the *floor*, the base model untouched.

Reported per method: held-out perplexity mean ± std over the seeds at every evaluated
round and at the end, and a verdict against FedAvg: ``better`` / ``worse`` only when the
difference of the means exceeds both standard deviations, else ``within noise``
(``quality_stats``). The claims the method papers make are checked the same way, each
marked confirms / refutes / cannot tell. With ``--dp-epsilon`` (a list) the methods whose
aggregate is a sum (FedAvg, FFA-LoRA, Fed-SB) run under per-client DP-SGD at each ε.

Writes ``quality.md``, ``quality.csv``, ``quality.json`` and ``quality.png`` to ``--out``.
``--quick`` (tiny smoke-test model, one seed, one scenario) is what the test suite runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from sqlalchemy import func, select
from sqlalchemy.orm import Session

import aggregation
from aggregation.fed_sb import INIT_SOURCES
from cli.app import main as cli_main
from core.config import RunConfig, parse_ranks
from core.data import load_examples, partition, split_heldout
from core.model import AdaptedModel, AdapterSpec
from core.presets import load_base
from core.trainer import TrainConfig, evaluate, train
from server.db.models import Run
from server.db.session import open_database
from server.report import load_series
from simulations.quality_stats import Curve, Summary, claims, summarise, write_outputs


@dataclass(frozen=True)
class Size:
    """One benchmark size: the run-config values every method shares (stated in the table header)."""

    model: str
    num_clients: int
    clients_per_round: int
    rounds: int
    local_steps: int
    eval_examples: int
    max_seq_len: int
    batch_size: int
    eval_every: int
    max_rank: int = 16
    partition: str = "dirichlet:0.5"

    def describe(self) -> str:
        return (f"{self.model}, {self.num_clients} clients ({self.clients_per_round}/round), {self.partition}, "
                f"{self.rounds} rounds x {self.local_steps} local steps, batch {self.batch_size}, "
                f"seq {self.max_seq_len}, {self.eval_examples} held-out examples, eval every {self.eval_every}")


# (11 methods mixed + 4 claim methods homogeneous) x 3 seeds = 45 runs on the in-process
# engine. Sized for 2 CPU cores: at batch 8 x 48 tokens a SmolLM2 run took ~120 s, nearly all
# of it training, so batch 4. Not fewer tokens: SmolLM2's chat template and the prompt take
# 31-65 (median 38) of them, and at 32 no answer token is left.
DEFAULT = Size(model="smollm2", num_clients=6, clients_per_round=3, rounds=4, local_steps=2, eval_examples=16,
               max_seq_len=48, batch_size=4, eval_every=2)
QUICK = Size(model="tiny", num_clients=3, clients_per_round=3, rounds=2, local_steps=2, eval_examples=8,
             max_seq_len=48, batch_size=4, eval_every=1, max_rank=8)
#: scenario -> client ranks, cycled over partitions; the quick size caps them at its max-rank
SCENARIOS = {"mixed": "2,4,8,16", "homogeneous": "8,8,8,8"}
QUICK_SCENARIOS = {"mixed": "2,4,8", "homogeneous": "4,4,4"}
# the methods whose aggregate is a weighted sum (the capability their classes declare)
DP_AGGREGATORS = tuple(aggregation.weighted_sum_names())
#: Fed-SB's init sources (run config sb-init), the default first
SB_INITS = (RunConfig().sb_init, *(i for i in INIT_SOURCES if i != RunConfig().sb_init))
#: the homogeneous control runs only the methods whose claims it checks
CONTROL_METHODS = ("fedavg", "flora", "lora-fair", "fed-sb")


def ranks_for(size: Size, scenario: str) -> str:
    return (QUICK_SCENARIOS if size.max_rank < 16 else SCENARIOS)[scenario]


def simulate_args(name: str, size: Size, *, ranks: str, seed: int, out: Path, lr: float = 0.0,
                  data: str = "chatterbot", engine: str = "inprocess") -> list[str]:
    """``fedlora simulate`` flags for one run; ``lr`` 0 is the method's recommendation.

    ``engine`` ``inprocess`` (the default here) runs the same ServerApp and ClientApp without
    Flower's engine: on 2 cores the engine's start and Ray cost more than a run's training,
    and quality does not depend on it (``cli.inprocess``).
    """
    return ["simulate", "--engine", engine, "--aggregator", name, "--model", size.model, "--num-clients", str(size.num_clients),
            "--clients-per-round", str(size.clients_per_round), "--rounds", str(size.rounds),
            "--local-steps", str(size.local_steps), "--ranks", ranks, "--max-rank", str(size.max_rank),
            "--lr", str(lr), "--eval-examples", str(size.eval_examples), "--eval-every", str(size.eval_every),
            "--max-seq-len", str(size.max_seq_len), "--partition", size.partition, "--data", data,
            "--batch-size", str(size.batch_size), "--seed", str(seed), "--db", f"sqlite:///{out / 'quality.db'}",
            "--home", str(out / "flwr"), "--checkpoint-dir", str(out / "checkpoints")]


#: fedlora's exit statuses for Ctrl-C and SIGTERM (cli.app)
INTERRUPTED = (130, 143)


def run_one(name: str, args: list[str], out: Path) -> Curve:
    """One simulation through the CLI; its evaluated rounds and upload read back from the database."""
    engine = open_database(f"sqlite:///{out / 'quality.db'}")
    with Session(engine) as session:  # a run stopped before its row exists must not read the previous one
        before = session.scalar(select(func.max(Run.id))) or 0
    start = time.monotonic()
    code = cli_main(args)
    wall = time.monotonic() - start
    if code in INTERRUPTED:  # the CLI caught Ctrl-C or SIGTERM for its run: the sweep stops too
        raise KeyboardInterrupt(f"fedlora simulate exited {code}")
    with Session(engine) as session:
        run_id = session.scalars(select(Run.id).where(Run.aggregator == name, Run.id > before)
                                 .order_by(Run.id.desc())).first()
        if run_id is None:
            return Curve(name=name, points=(), mb_up=0.0, wall_s=wall, status=f"failed (exit {code})", lr=math.nan)
        return _curve(session, run_id, name, wall)


def _curve(session: Session, run_id: int, name: str, wall: float) -> Curve:
    s = load_series(session, run_id)
    lr = float(s.config.get("learning-rate", math.nan))
    return Curve(name=name, points=tuple(zip(s.eval_rounds, s.eval_ppl)), mb_up=sum(s.mb_up), wall_s=wall,
                 status=s.status, lr=lr)


def recorded_run(name: str, args: list[str], out: Path) -> Curve | None:
    """A completed run of exactly this experiment in the benchmark's database, else None (``--reuse``).

    Same experiment: the run config ``fedlora simulate`` would record for ``args`` equals the
    recorded one on every key but the run's tag and where it is stored (the keys a resume may
    change, ``server.checkpoint.VOLATILE_KEYS``). An interrupted benchmark then continues where
    it stopped instead of running its finished runs again.
    """
    from cli.app import build_parser
    from cli.simulate import config_from_args
    from server.checkpoint import config_differences

    requested = config_from_args(build_parser().parse_args(args)).to_flower()
    with Session(open_database(f"sqlite:///{out / 'quality.db'}")) as session:
        for run in session.scalars(select(Run).where(Run.aggregator == name, Run.status == "completed")
                                   .order_by(Run.id.desc())):
            if set(config_differences(dict(run.config), requested)) <= {"run-tag"}:
                wall = (run.finished_at - run.started_at).total_seconds() if run.finished_at else math.nan
                print(f"  {name}: reusing run {run.id} (same config, completed)", flush=True)
                return _curve(session, run.id, name, wall)
    return None


def eval_rounds(size: Size) -> list[int]:
    """The rounds the server evaluates: 0, every ``eval-every``-th, and the last."""
    return sorted({0, size.rounds, *range(size.eval_every, size.rounds + 1, size.eval_every)})


def references(size: Size, seed: int, *, ranks: str, private_run: bool = False) -> tuple[Curve, Curve]:
    """(centralised ceiling, base-model floor), on the same held-out rows the server evaluates.

    The ceiling is trained without DP even when the federated runs use it (``private_run``
    only labels it so), at FedAvg's recommended rate: plain LoRA on A and B.
    """
    start = time.monotonic()
    base = load_base(size.model)
    train_rows, heldout = split_heldout(load_examples("chatterbot"), 0.1, seed)
    heldout = heldout[: size.eval_examples]
    floor = evaluate(base.model, heldout, base.tokenizer, max_len=size.max_seq_len).perplexity
    rounds = eval_rounds(size)
    floor_row = Curve(name="base model (floor)", points=tuple((r, floor) for r in rounds), mb_up=0.0,
                      wall_s=time.monotonic() - start, status="reference", lr=math.nan)
    # same examples the clients hold, pooled; same optimiser steps per "round" as the federation
    pooled = [ex for part in partition(train_rows, size.partition, size.num_clients, seed) for ex in part]
    lr = aggregation.recommended("fedavg").learning_rate
    torch.manual_seed(seed)  # before the adapter exists: its A is drawn from this RNG
    adapted = AdaptedModel(copy.deepcopy(base.model), AdapterSpec(kind="lora", rank=max(parse_ranks(ranks)),
                                                                  alpha=16.0, targets=("q_proj", "v_proj")))
    adapted.set_trainable(frozenset({"A", "B"}))
    points = [(0, floor)]
    start = time.monotonic()
    for r in range(1, size.rounds + 1):
        train(adapted, pooled, base.tokenizer, TrainConfig(steps=size.clients_per_round * size.local_steps,
                                                            batch_size=size.batch_size, learning_rate=lr,
                                                            max_len=size.max_seq_len, seed=seed + r))
        if r in rounds:
            points.append((r, evaluate(adapted.model, heldout, base.tokenizer, max_len=size.max_seq_len).perplexity))
    label = "centralised LoRA (ceiling, no DP)" if private_run else "centralised LoRA (ceiling)"
    return Curve(name=label, points=tuple(points), mb_up=0.0, wall_s=time.monotonic() - start,
                 status="reference", lr=lr), floor_row


def dp_flags(out: Path, name: str, epsilon: float, seed: int) -> list[str]:
    # each method and seed gets its own privacy ledger: they must not spend each other's budget
    if not epsilon:
        return []
    return ["--dp-epsilon", str(epsilon), "--dp-state-dir", str(out / "dp-state" / f"{name}-eps{epsilon}-s{seed}")]


def run_table(names: list[str], size: Size, *, scenario: str, seeds: list[int], out: Path, epsilon: float = 0.0,
              with_references: bool = True, engine: str = "inprocess", extra: dict[str, list[str]] | None = None,
              reuse: bool = False) -> list[Summary]:
    """Every method over every seed in one scenario (and DP level), summarised.

    ``extra`` maps a row label to (aggregator, extra flags): e.g. Fed-SB with another init.
    """
    ranks = ranks_for(size, scenario)
    runs: dict[str, list[Curve]] = {}
    rows = [(name, name, []) for name in names] + [(label, flags[0], flags[1:]) for label, flags in (extra or {}).items()]
    for seed in seeds:
        for label, name, flags in rows:
            args = (simulate_args(name, size, ranks=ranks, seed=seed, out=out, engine=engine) + flags
                    + dp_flags(out, label, epsilon, seed))
            curve = (reuse and recorded_run(name, args, out)) or run_one(name, args, out)
            runs.setdefault(label, []).append(replace(curve, name=label))
        if with_references:
            for ref in references(size, seed, ranks=ranks, private_run=bool(epsilon)):
                runs.setdefault(ref.name, []).append(ref)
    return [summarise(curves) for curves in runs.values()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 rounds, one seed: for the test suite")
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--aggregators", default="", help="comma list (default: all, or the DP set with --dp-epsilon)")
    parser.add_argument("--seeds", default="", help="comma list (default 0,1,2; --quick: 0)")
    parser.add_argument("--scenarios", default="", help=f"comma list of {', '.join(SCENARIOS)} (default: both; "
                                                        "--quick: mixed)")
    parser.add_argument("--dp-epsilon", default="", help="comma list of ε: FedAvg, FFA-LoRA, Fed-SB under DP-SGD")
    parser.add_argument("--rounds", type=int, default=0, help="override the size's rounds")
    parser.add_argument("--eval-examples", type=int, default=0, help="override the size's held-out examples")
    parser.add_argument("--sb-inits", default="", help="comma list of Fed-SB inits to add as rows beside the "
                                                       f"default one ({', '.join(SB_INITS)}), in the mixed-rank "
                                                       "tables (where Fed-SB's claim is checked)")
    parser.add_argument("--reuse", action="store_true",
                        help="take a completed run of the same config from --out's database instead of running it "
                             "again (an interrupted benchmark continues)")
    parser.add_argument("--engine", default="inprocess", choices=("inprocess", "flower"),
                        help="fedlora simulate's --engine (inprocess: no Flower engine start per run)")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else DEFAULT
    size = replace(size, rounds=args.rounds or size.rounds, eval_examples=args.eval_examples or size.eval_examples)
    epsilons = [float(e) for e in args.dp_epsilon.split(",") if e]
    seeds = [int(s) for s in args.seeds.split(",") if s] or ([0] if args.quick else [0, 1, 2])
    scenarios = [s for s in args.scenarios.split(",") if s] or (["mixed"] if args.quick else list(SCENARIOS))
    names = [n for n in args.aggregators.split(",") if n] or (list(DP_AGGREGATORS) if epsilons else aggregation.names())
    for name in names:
        aggregation.get_class(name)  # unknown names fail before anything runs
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; valid: {', '.join(SCENARIOS)}")
    inits = [i for i in args.sb_inits.split(",") if i]
    if sorted(set(inits) - set(SB_INITS)):
        raise SystemExit(f"unknown --sb-inits {sorted(set(inits) - set(SB_INITS))}; valid: {', '.join(SB_INITS)}")
    extra = {f"fed-sb (init {i})": ["fed-sb", "--sb-init", i] for i in inits}
    args.out.mkdir(parents=True, exist_ok=True)
    tables: dict[str, list[Summary]] = {}
    for scenario in scenarios:
        for epsilon in epsilons or [0.0]:
            label = f"{scenario} ranks {ranks_for(size, scenario)}" + (f", DP ε={epsilon:g}" if epsilon else "")
            # the homogeneous control: only the methods whose claims it checks, of those asked for
            chosen = names if scenario != "homogeneous" else [n for n in names if n in CONTROL_METHODS]
            tables[label] = run_table(chosen, size, scenario=scenario, seeds=seeds, out=args.out, epsilon=epsilon,
                                      engine=args.engine, extra=extra if scenario == "mixed" else None,
                                      reuse=args.reuse)
    header = (f"{size.describe()}; seeds {','.join(map(str, seeds))}; each method at its recommended lr; "
              f"fed-sb rows without an init named use sb-init {SB_INITS[0]}; engine {args.engine}")
    verdicts = claims(tables)
    path = write_outputs(tables, verdicts, args.out, header)
    (args.out / "quality.json").write_text(json.dumps(
        {"size": asdict(size), "seeds": seeds, "claims": verdicts,
         "tables": {k: [asdict(s) for s in v] for k, v in tables.items()}}, indent=1, default=str))
    print(path.read_text())
    print(f"CSV: {args.out / 'quality.csv'}  JSON: {args.out / 'quality.json'}  plot: {args.out / 'quality.png'}")
    return 0 if all(s.status in ("completed", "reference") for v in tables.values() for s in v) else 1


if __name__ == "__main__":
    raise SystemExit(main())

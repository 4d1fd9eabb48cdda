"""Performance suite, section ``server``: the server's own math, standalone and inside the simulation.

    python -m simulations.bench_perf --sections server [--quick]
    python -m simulations.bench_server [--quick] [--json PATH]

Standalone (this process, SmolLM2-135M shapes: q 576x576, v 192x576 per layer, max-rank 64;
``--quick``: 4 of its 30 layers), each with the BLAS pools limited to one thread
(``server.threads.server_math(1)``, what ``server-threads=1`` does) and without a limit:

* Fed-SB's init, per source: ``random`` (seeded QRs), ``server-public`` (the SVDs of the
  dense sign steps; the gradients are not part of it) and ``federated`` (the server's side:
  QR, least squares and SVD of the summed sketches);
* one Fed-SB aggregation of 10 clients (ranks 4..64) plus the strategy's relative-error
  diagnostic, as ``LoraStrategy.aggregate_train`` runs them.

Inside the simulation (``fedlora simulate --aggregator fed-sb``, 2 clients, 2 rounds; SmolLM2,
``--quick``: the tiny model), per init and with ``server-threads`` 1 and 0 (no limit): the
init's seconds and bytes as recorded (``initialisations``; for ``federated`` they include the
nodes' replies, and the engine's start when round 0 is its first contact) and each round's
``aggregate_seconds`` (aggregation plus diagnostic), read from the run's database.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import aggregation
from aggregation import ClientUpdate, ModelSpec, ModuleShape
from aggregation.diagnostics import relative_error
from aggregation.fed_sb import lora_sb_init
from aggregation.sb_sketch import init_from_sketches, sketch_matrices, sketch_sizes
from server.threads import server_math

INITS = ("random", "server-public", "federated")
MAX_RANK = 64


def smollm2_modules(layers: int) -> dict[str, ModuleShape]:
    return {f"model.layers.{i}.self_attn.{p}": ModuleShape(d, 576)
            for i in range(layers) for p, d in (("q_proj", 576), ("v_proj", 192))}


def _timed(work: Callable[[], Any], threads: int, repeat: int = 3) -> float:
    """Median seconds of ``work`` under ``server_math(threads)`` (0: no limit)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        with server_math(threads):
            work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def standalone(quick: bool) -> dict[str, dict[str, float]]:
    return standalone_figures(layers=4 if quick else 30, repeat=3)


def standalone_figures(*, layers: int, repeat: int) -> dict[str, dict[str, float]]:
    modules = smollm2_modules(layers)
    spec = ModelSpec(modules=modules, max_rank=MAX_RANK, seed=0)
    rng = np.random.default_rng(0)
    signs = {n: np.sign(rng.standard_normal((s.d_out, s.d_in))) * 1e-3 for n, s in modules.items()}
    sketches = {}
    for n, s in modules.items():
        k, l = sketch_sizes(s, rank=MAX_RANK, oversample=10)
        sketches[n] = (rng.standard_normal((s.d_out, k)), rng.standard_normal((l, s.d_in)),
                       sketch_matrices(0, n, s, rank=MAX_RANK, oversample=10)[1])
    fed_sb = aggregation.create("fed-sb")
    state = fed_sb.init_state(spec)
    ranks = [4, 8, 16, 64, 4, 8, 16, 64, 16, 64]
    updates = [ClientUpdate(node_id=f"n{i}", num_examples=10 + i, rank=r, alpha=16.0,
                            tensors={n: {"R": rng.standard_normal((r, r))} for n in modules})
               for i, r in enumerate(ranks)]

    def aggregate_round() -> None:
        result = fed_sb.aggregate(state, updates)
        relative_error(fed_sb, state, result, updates)

    work = {
        "init_random": lambda: fed_sb.init_state(spec),
        "init_server_public_svds": lambda: [lora_sb_init(m, MAX_RANK) for m in signs.values()],
        "init_federated_server": lambda: [init_from_sketches(y, w, psi, modules[n], rank=MAX_RANK, learning_rate=1e-3)
                                          for n, (y, w, psi) in sketches.items()],
        "aggregate_10_clients": aggregate_round,
    }
    return {name: {"limited_s": _timed(fn, 1, repeat), "unlimited_s": _timed(fn, 0, repeat)}
            for name, fn in work.items()}


def in_simulation(workdir: Path, quick: bool) -> list[dict[str, Any]]:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from server.db.models import InitRecord, RoundRecord, Run
    from server.db.session import open_database
    from simulations.bench_perf import simulate  # the suite's subprocess runner (and peak RSS)

    model = ["--model", "tiny", "--max-rank", "16", "--ranks", "4,8"] if quick else ["--model", "smollm2"]
    rows = []
    for init in INITS:
        for threads in (1, 0):
            label = f"{init}-t{threads}"
            db = f"sqlite:///{workdir / f'server-{label}.db'}"
            start = time.monotonic()
            code, peak = simulate([*model, "--aggregator", "fed-sb", "--sb-init", init,
                                   "--server-threads", str(threads), "--num-clients", "2",
                                   "--clients-per-round", "2", "--rounds", "2", "--local-steps", "1",
                                   "--eval-examples", "8", "--db", db,
                                   "--home", str(workdir / f"flwr-{label}"),
                                   "--checkpoint-dir", str(workdir / f"ckpt-{label}")], workdir)
            row: dict[str, Any] = {"init": init, "server_threads": threads, "exit_code": code,
                                   "wall_s": time.monotonic() - start, "peak_rss_MB": peak}
            if code == 0:
                with Session(open_database(db, create=False, write=False)) as s:
                    run = s.scalars(select(Run)).one()
                    record = s.scalars(select(InitRecord).where(InitRecord.run_id == run.id)).one()
                    rounds = s.scalars(select(RoundRecord).where(RoundRecord.run_id == run.id)
                                       .order_by(RoundRecord.number)).all()
                row.update(init_s=record.seconds, init_bytes_up=record.bytes_up,
                           aggregate_s=[r.aggregate_seconds for r in rounds])
            else:
                row["error"] = f"simulate exited {code}; see {workdir / 'simulate.log'}"
            rows.append(row)
    return rows


def measure(workdir: Path, quick: bool) -> dict[str, Any]:
    return {"standalone": standalone(quick), "simulation": in_simulation(workdir, quick)}


def show(result: dict[str, Any]) -> None:
    print("  standalone (this process; seconds, median of repeats):")
    for name, row in result["standalone"].items():
        ratio = row["unlimited_s"] / row["limited_s"] if row["limited_s"] else float("nan")
        print(f"    {name:26s} 1 thread {row['limited_s']:8.4f}   no limit {row['unlimited_s']:8.4f}   "
              f"no limit / 1 thread {ratio:6.2f}")
    print("  inside the simulation (fed-sb, 2 clients, 2 rounds):")
    for row in result["simulation"]:
        if "error" in row:
            print(f"    {row['init']:13s} server-threads {row['server_threads']}: {row['error']}")
            continue
        rounds = ", ".join(f"{s:.4f}" for s in row["aggregate_s"])
        print(f"    {row['init']:13s} server-threads {row['server_threads']}: init {row['init_s']:7.2f} s "
              f"({row['init_bytes_up']} B up), aggregation per round {rounds} s, wall {row['wall_s']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 layers standalone, the tiny model in the simulation")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(tmp), args.quick)
        show(result)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

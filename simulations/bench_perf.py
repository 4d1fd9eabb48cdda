"""Performance suite: where the time, bytes and memory of a federated round go.

    python -m simulations.bench_perf [--quick] [--json PATH] [--sections 1,2,3,4,5,6,deploy]

Prints, in one run (ratios where a ratio means something):
  1. aggregation time per aggregator at LLaMA-2-7B adapter shapes (q, v; 32 layers) with
     10 clients, over a plain summation pass of the same uploads (simulations.bench_aggregation);
  2. bytes on the wire per message vs the payload's own array bytes (Flower's overhead),
     from the objects Flower actually serialises for a SmolLM2 train message;
  3. database write time per round (SQLite, and PostgreSQL when reachable, in a scratch
     schema that is dropped afterwards);
  4. round overhead in the default simulation: (round period - training on the slowest
     actor) / round period, with aggregation and the server evaluation (its own seconds, and
     what it held the next round up) shown apart (simulations.bench_warm);
  5. peak memory (RSS of the whole process tree) with 1,000 virtual clients, 10 per round,
     against the same run with 10 virtual clients;
  6. deployment: round latency of a real coordinator (SuperLink + public front, TLS, node
     authentication) with two nodes connected through the front, then two connected straight
     to the SuperLink's loopback port, same run; and the time one Fleet call (small, and a
     5 MiB body: Flower's array chunk) takes through the front and without it;
  7. (``deploy``) warm nodes: deployment rounds with and without the resident node worker,
     tiny model and SmolLM2: non-training share, base-model loads per node, round 1 / round 2.
  8. (``server``) the server's math: Fed-SB init and aggregation, standalone and inside the
     simulation, with and without the BLAS thread limit (simulations.bench_server).
Results are also written as JSON so runs can be compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil

import aggregation
from aggregation import ModelSpec, ModuleShape
from server.db.session import scratch_schema
from simulations import bench_aggregation as ba
from simulations import bench_server
from simulations.bench_deploy import deployment_latency, print_deployment
from simulations.bench_warm import print_simulation, simulation_overhead, print_warm, warm_deployment

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


def aggregation_vs_sum(quick: bool) -> list[dict]:
    setting = ba.QUICK if quick else ba.FULL
    return [{k: r.get(k) for k in ("aggregator", "clients", "ranks", "agg_s", "x_sum", "peak_MB", "error")}
            for r in ba.run([10], setting, sample_size=2 if not quick else setting.modules, pool_mb=64, seed=0)]


def wire_overhead() -> dict:
    """Serialised size of a real train message vs the bytes of its arrays.

    Flower sends content-addressed objects (arrays in chunks, identified by hash), so
    identical chunks travel once: an all-zero initial B costs less than its raw size.
    The overhead is therefore measured on a state after one aggregation of random
    updates (no repeated chunks), and the initial message is reported beside it.
    """
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from aggregation import ClientUpdate
    from server.strategy import LoraStrategy
    from server.local_grid import FakeGrid, task_identity

    task_identity()
    # SmolLM2-135M: 30 layers, q 576x576, v 192x576
    modules = {f"model.layers.{i}.self_attn.{p}": ModuleShape(d, 576)
               for i in range(30) for p, d in (("q_proj", 576), ("v_proj", 192))}
    rng = np.random.default_rng(0)
    rows = {}
    for name in ("fedavg", "fed-sb"):
        strategy = LoraStrategy(aggregator=aggregation.create(name), spec=ModelSpec(modules=modules, max_rank=8),
                                train_config={}, clients_per_round=1, min_clients=1)

        def measure() -> tuple[int, int]:
            (msg,) = strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid({1: 8}))
            strategy.nodes.clear()  # the next message is a first contact again (frozen factors included)
            payload = sum(len(a.data) for rec in msg.content.array_records.values() for a in rec.values())
            wire = sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())
            return payload, wire

        initial = measure()
        factors = sorted(strategy.aggregator.uplink)
        shapes = {"A": lambda s: (8, s.d_in), "B": lambda s: (s.d_out, 8), "R": lambda s: (8, 8)}
        updates = [ClientUpdate(node_id=str(k), num_examples=10, rank=8, alpha=16.0,
                                tensors={m: {f: rng.normal(size=shapes[f](s)) for f in factors} for m, s in modules.items()})
                   for k in range(2)]
        strategy.state = strategy.aggregator.aggregate(strategy.state, updates).state
        payload, wire = measure()
        rows[name] = {"payload_bytes": payload, "wire_bytes": wire, "overhead_ratio": wire / payload,
                      "initial_payload_bytes": initial[0], "initial_wire_bytes": initial[1]}
    return rows


def db_write_time(url: str, repeats: int = 20) -> dict:
    from server.db.session import open_database
    from server.recording import RunRecorder
    from server.rounds import ClientOutcome, RoundReport

    engine = open_database(url)
    recorder = RunRecorder(engine)
    run_id = recorder.start_run(config={"bench": True}, aggregator="fedavg", model="tiny", tag="", flwr_run_id=None)
    times = []
    for r in range(1, repeats + 1):
        outcomes = tuple(ClientOutcome(n, "ok", rank=8, num_examples=100, train_loss=1.0, seconds=1.0,
                                       bytes_down=10**6, bytes_up=10**6, metrics={"steps": 3.0}) for n in range(10))
        report = RoundReport(number=r, started_at=datetime.now(), finished_at=datetime.now(), outcomes=outcomes,
                             aggregated=True, train_loss=1.0, relative_error=0.1, aggregate_seconds=0.01)
        start = time.perf_counter()
        recorder.record_round(run_id, report, None)
        times.append(time.perf_counter() - start)
    engine.dispose()
    return {"median_ms": 1000 * statistics.median(times), "max_ms": 1000 * max(times), "clients_per_round": 10}


def simulate(args: list[str], workdir: Path) -> tuple[int, float]:
    """Run `fedlora simulate` in a subprocess; returns (exit code, peak RSS MB of the tree)."""
    proc = subprocess.Popen([sys.executable, "-m", "cli", "simulate", *args], cwd=ROOT,
                            stdout=open(workdir / "simulate.log", "w"), stderr=subprocess.STDOUT)
    peak = 0.0
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()) / 2**20)
        except psutil.Error:
            pass
        time.sleep(0.5)
    return proc.returncode, peak


def virtual_clients(workdir: Path, count: int) -> dict:
    """One round of the tiny model with ``count`` virtual clients, 10 per round."""
    db = f"sqlite:///{workdir / f'virtual{count}.db'}"
    start = time.monotonic()
    code, peak = simulate(["--model", "tiny", "--num-clients", str(count), "--clients-per-round", "10",
                           "--rounds", "1", "--partition", "iid", "--local-steps", "1", "--eval-examples", "8",
                           "--ranks", "4", "--db", db, "--home", str(workdir / f"flwr{count}"),
                           "--checkpoint-dir", str(workdir / f"c{count}")], workdir)
    return {"clients": count, "exit_code": code, "peak_rss_MB": peak, "wall_s": time.monotonic() - start}


def memory_with_many_clients(workdir: Path) -> dict:
    """Peak RSS of the whole process tree with 1,000 virtual clients against 10 (the same 10 train)."""
    many, few = virtual_clients(workdir, 1000), virtual_clients(workdir, 10)
    return {"1000": many, "10": few, "peak_ratio_1000_over_10": many["peak_rss_MB"] / few["peak_rss_MB"],
            "extra_MB_per_virtual_client": (many["peak_rss_MB"] - few["peak_rss_MB"]) / 990}


def print_wire(rows: dict) -> None:
    for name, row in rows.items():
        print(f"  {name:8s} payload {row['payload_bytes']:>10d} B  wire {row['wire_bytes']:>10d} B  "
              f"ratio {row['overhead_ratio']:.4f}   (first message, zero-initialised: payload "
              f"{row['initial_payload_bytes']} B, wire {row['initial_wire_bytes']} B after dedup)")


def db_both(workdir: Path) -> dict:
    out = {"sqlite": db_write_time(f"sqlite:///{workdir / 'db.sqlite'}")}
    try:
        with scratch_schema(POSTGRES_URL, prefix="fedlora_bench") as url:
            out["postgresql"] = db_write_time(url)
    except Exception as exc:  # noqa: BLE001 - report and go on
        out["postgresql"] = {"skipped": f"{type(exc).__name__}: {str(exc)[:80]}"}
    return out


def print_rows(rows: dict | list) -> None:
    items = rows.items() if isinstance(rows, dict) else enumerate(rows)
    for _, row in items:
        print("  " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    measure: Callable[[Path, bool], Any]
    show: Callable[[Any], None]


SECTIONS = {
    1: Section("aggregation", "aggregation time / plain summation pass (10 clients; x_sum is the ratio)",
               lambda _, quick: aggregation_vs_sum(quick), lambda rows: None),  # rows print as they come
    2: Section("wire", "Flower message bytes on the wire / payload array bytes (SmolLM2 shapes, rank 8)",
               lambda _, quick: wire_overhead(), print_wire),
    3: Section("db", "database write time per round (10 client rows, one transaction)",
               lambda workdir, _: db_both(workdir), print_rows),
    4: Section("round_overhead", "round overhead in the default simulation, training counted per actor "
               "(--quick: tiny model)", simulation_overhead, print_simulation),
    5: Section("virtual_clients", "peak memory (RSS, whole process tree), 1,000 vs 10 virtual clients, "
               "10 per round (tiny model)", lambda workdir, _: memory_with_many_clients(workdir),
               lambda r: print_rows([r["1000"], r["10"], {k: v for k, v in r.items() if k not in ("1000", "10")}])),
    6: Section("deployment", "deployment round latency and Fleet call time, through the public front vs "
               "straight to the SuperLink (tiny model, 2 nodes, TLS and node authentication on)",
               deployment_latency, print_deployment),
    7: Section("deploy", "warm nodes: a deployment round with and without the resident node worker (2 nodes "
               "through the CLI; tiny model and SmolLM2; --quick: tiny only)", warm_deployment, print_warm),
    8: Section("server", "the server's math (Fed-SB init, aggregation): standalone and inside the simulation, "
               "BLAS pools limited to 1 thread and not (simulations.bench_server)", bench_server.measure,
               bench_server.show),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and the tiny model (for tests)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--sections", default=",".join(map(str, SECTIONS)),
                        help="comma list of section numbers to run (default: all)")
    args = parser.parse_args(argv)
    by_key = {section.key: section for section in SECTIONS.values()}
    try:  # by number or by key: --sections 4,deploy
        chosen = [by_key[n.strip()] if n.strip() in by_key else SECTIONS[int(n)] for n in args.sections.split(",")
                  if n.strip()]
    except (KeyError, ValueError):
        parser.error(f"--sections {args.sections!r}: valid sections are "
                     + ", ".join(f"{n} ({s.key})" for n, s in SECTIONS.items()))
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for number, section in ((n, SECTIONS[n]) for n in SECTIONS if SECTIONS[n] in chosen):
            print(f"\n## {number}. {section.title}")
            if section.key == "aggregation":
                setting = ba.QUICK if args.quick else ba.FULL
                ba.print_header(setting, setting.modules if args.quick else 2, 64, 1)
            results[section.key] = section.measure(Path(tmp), args.quick)
            section.show(results[section.key])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
        print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

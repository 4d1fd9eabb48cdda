"""Performance suite: is a round training, or waiting? (simulation and deployment)

``simulation_overhead`` (section 4) runs the default simulation and splits each round's
period — from one round's start to the next's, so everything that holds the next round
up is in it — into the training on the critical path and the rest. Training on the
critical path is per actor: Ray runs the sampled clients on as many actors as the
machine has cores, so two clients on one actor train one after the other and both
count as training (the reply's ``process-id`` says which actor trained it); the slowest
actor's total is the round's training. The server-side evaluation is shown as its own
share: its seconds (it runs beside the next round) and what it held the round up.

``warm_deployment`` (section 7, ``--sections deploy``) starts a real coordinator and two
SuperNodes through the CLI on 127.0.0.1 and runs the same 3 rounds with the nodes'
resident workers and without them (``client start --no-worker``: a fresh ClientApp per
message, Flower's default), for the tiny model and SmolLM2. Per round: wall time, the
slowest node's training, the non-training share; per node: how often it loaded the base
model (from each reply's ``base-loads`` and ``process-id``). The JSON keys the issue
asks for are ``deploy.<model>.non_training_share`` (rounds 2..n, median, worker path),
``deploy.<model>.base_model_loads_per_node`` and ``deploy.<model>.non_training_vs_cold``.
"""

from __future__ import annotations

import os
import statistics
from collections import defaultdict
from pathlib import Path

from simulations.bench_deploy import DEPLOY_RUN, _fedlora, _stop, _wait_for, start_nodes

MODELS = ("tiny", "smollm2")


def critical_training(clients) -> float:
    """The slowest actor's (process's) total training seconds in one round."""
    per_process: dict[object, float] = defaultdict(float)
    for c in clients:
        if c.status == "ok":
            per_process[(c.metrics or {}).get("process-id", c.node_id)] += c.seconds or 0.0
    return max(per_process.values(), default=0.0)


def base_loads(clients) -> dict[str, int]:
    """Base-model loads per node: each training process reports its own running count."""
    per: dict[str, dict[object, int]] = defaultdict(dict)
    for c in clients:
        m = c.metrics or {}
        if c.status == "ok" and "base-loads" in m:
            key = m.get("process-id", id(c))
            per[c.node_id][key] = max(per[c.node_id].get(key, 0), int(m["base-loads"]))
    return {node: sum(by_process.values()) for node, by_process in per.items()}


def round_table(db: str, tag: str | None = None) -> list[dict]:
    """Per round of the run (by tag, or the only run): period, wall, training, shares."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from server.db.models import ClientUpdateRecord, Evaluation, RoundRecord, Run
    from server.db.session import open_database

    with Session(open_database(db)) as s:
        run = s.scalars(select(Run).where(Run.tag == tag)).one() if tag else s.scalars(select(Run)).one()
        rounds = list(s.scalars(select(RoundRecord).where(RoundRecord.run_id == run.id).order_by(RoundRecord.number)))
        evals = {e.round_number: e.seconds for e in s.scalars(select(Evaluation).where(Evaluation.run_id == run.id))}
        rows = []
        for i, r in enumerate(rounds):
            clients = list(s.scalars(select(ClientUpdateRecord).where(ClientUpdateRecord.round_id == r.id)))
            wall = (r.finished_at - r.started_at).total_seconds()
            # the last round has no successor: its period ends when the round is written
            period = (rounds[i + 1].started_at - r.started_at).total_seconds() if i + 1 < len(rounds) else wall
            training = critical_training(clients)
            rows.append({
                "round": r.number, "period_s": period, "wall_s": wall, "training_s": training,
                "non_training_share": (period - training) / period if period else 0.0,
                "aggregation_s": r.aggregate_seconds, "server_eval_s": evals.get(r.number, 0.0),
                "eval_wait_s": (r.metrics or {}).get("eval-wait-seconds", 0.0),
                "clients": len(clients), "actors": len({(c.metrics or {}).get("process-id") for c in clients}),
                "base_loads": base_loads(clients),
            })
    return rows


def simulation_overhead(workdir: Path, quick: bool) -> dict:
    from simulations.bench_perf import simulate

    db = f"sqlite:///{workdir / 'overhead.db'}"
    model = ["--model", "tiny", "--lr", "0.05"] if quick else []
    rounds = 3 if quick else 4
    code, _ = simulate([*model, "--rounds", str(rounds), "--db", db, "--home", str(workdir / "flwr"),
                        "--checkpoint-dir", str(workdir / "ckpt")], workdir)
    if code != 0:
        return {"error": f"simulate exited {code}; see {workdir / 'simulate.log'}"}
    rows = round_table(db)
    later = [r for r in rows if r["round"] > 1] or rows  # round 1 also starts Ray's actors
    period = sum(r["period_s"] for r in later)
    return {
        "rounds": rows,
        "non_training_share": statistics.median(r["non_training_share"] for r in later),
        "eval_seconds_share": sum(r["server_eval_s"] for r in later) / period,
        "eval_blocking_share": sum(r["eval_wait_s"] for r in later) / period,
    }


def print_simulation(result: dict) -> None:
    if "error" in result:
        print(f"  {result['error']}")
        return
    for r in result["rounds"]:
        print(f"  round {r['round']}: period {r['period_s']:.1f} s, training {r['training_s']:.1f} s on the slowest "
              f"of {r['actors']} actors ({r['clients']} clients), share not training {r['non_training_share']:.2f}; "
              f"aggregation {r['aggregation_s']:.2f} s, evaluation {r['server_eval_s']:.1f} s "
              f"(held the round up {r['eval_wait_s']:.2f} s)")
    print(f"  rounds 2..n: non-training share {result['non_training_share']:.3f} (median); evaluation "
          f"{result['eval_seconds_share']:.3f} of the time in its own seconds, {result['eval_blocking_share']:.3f} "
          "blocking")


def warm_deployment(workdir: Path, quick: bool) -> dict:
    from cli.local_superlink import free_port

    root = workdir / "warm"
    root.mkdir()
    public, local = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    db, home = f"sqlite:///{root / 'runs.db'}", root / "coordinator"
    ca = home / "certs" / "ca.crt"
    rounds = 2 if quick else 3
    coordinator = _fedlora(["coordinator", "start", "--host", "127.0.0.1", "--port", public.split(":")[1],
                            "--local-port", local.split(":")[1], "--hostname", "127.0.0.1", "--home", home,
                            "--db", db], root / "coordinator.log")
    out: dict = {"rounds_per_run": rounds}
    try:
        _wait_for(coordinator, root / "coordinator.log", "fedlora coordinator ready")
        for model in MODELS[:1] if quick else MODELS:
            out[model] = {}
            for path, worker in (("worker", True), ("cold", False)):
                label = f"{model}-{path}"
                nodes = start_nodes(root, label, public, ca, home, () if worker else ("--no-worker",))
                tag = f"warm-{label}-{os.getpid()}"
                try:
                    submitted = _fedlora(["run", "--coordinator", local, "--ca", ca, "--home", root / f"cli-{label}",
                                          "--rounds", rounds, *DEPLOY_RUN, "--set", f"model={model}",
                                          "--set", f"run-tag={tag}"], root / f"run-{label}.log")
                    if submitted.wait(timeout=1500) != 0:
                        raise RuntimeError(f"run {label} failed: {(root / f'run-{label}.log').read_text()[-2000:]}")
                finally:
                    for node, _ in nodes:
                        _stop(node)
                out[model][path] = round_table(db, tag)
            out[model].update(_summary(out[model]["worker"], out[model]["cold"]))
    finally:
        _stop(coordinator)
    return out


def _summary(worker: list[dict], cold: list[dict]) -> dict:
    def non_training_s(rows: list[dict]) -> float:
        return statistics.median(r["period_s"] - r["training_s"] for r in rows[1:] or rows)

    loads: dict[str, int] = defaultdict(int)
    for r in worker:
        for node, n in r["base_loads"].items():
            loads[node] = max(loads[node], n)  # one worker per node: its count only grows
    return {
        "non_training_share": statistics.median(r["non_training_share"] for r in worker[1:] or worker),
        "base_model_loads_per_node": max(loads.values(), default=0),
        "cold_base_model_loads_per_node": max((sum(r["base_loads"].get(n, 0) for r in cold)
                                               for n in {n for r in cold for n in r["base_loads"]}), default=0),
        "non_training_vs_cold": non_training_s(worker) / non_training_s(cold),
        "round1_vs_round2": worker[0]["wall_s"] / worker[1]["wall_s"] if len(worker) > 1 else None,
        "cold_round1_vs_round2": cold[0]["wall_s"] / cold[1]["wall_s"] if len(cold) > 1 else None,
    }


def print_warm(result: dict) -> None:
    for model in MODELS:
        if model not in result:
            continue
        m = result[model]
        for path in ("worker", "cold"):
            rows = ", ".join(f"{r['wall_s']:.1f}/{r['training_s']:.1f}" for r in m[path])
            print(f"  {model:8s} {path:6s} round wall/training s: {rows}")
        r12 = m["round1_vs_round2"]
        print(f"  {model:8s} worker path: non-training share (rounds 2..n, median) {m['non_training_share']:.3f}; "
              f"non-training s per round vs cold {m['non_training_vs_cold']:.3f}; base-model loads per node "
              f"{m['base_model_loads_per_node']} (cold path {m['cold_base_model_loads_per_node']}); round 1 / round 2 "
              + (f"{r12:.2f}" if r12 else "-"))

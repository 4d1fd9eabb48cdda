"""``fedlora simulate``: a federated run on Flower's simulation engine, on this machine.

Everything that can be checked is checked before a client trains (config, data,
partitioning, model, database); then a project-local SuperLink starts, the app is
submitted with ``flwr run``, a row per finished round is printed from the database
(``cli.progress``) and the SuperLink is stopped, also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from cli import APP_DIR, run_config
from cli.console import console
from cli.local_superlink import LocalSuperLink, terminate_tree
from cli.progress import central_plan, follow, mark_interrupted, summarize
from core.config import RunConfig, default_db_url
from core.data import load_examples, partition, split_heldout
from privacy.settings import parse_run_config
from server.db.session import masked, open_database
from server.tracking import MlflowSink, absolute_uri

#: keys ``simulate`` sets itself (the node count comes from --num-clients)
OWN_KEYS = frozenset({"simulation-nodes"})


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="run a federated simulation (Flower's simulation engine, or in-process)")
    p.add_argument("--num-clients", type=int, default=8, help="simulated nodes (SuperNodes)")
    add_engine_flags(p)
    run_config.add_flags(p, skip=OWN_KEYS)


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=sorted(ENGINES), default="flower",
                   help="flower: Flower's simulation engine (a SuperLink, Ray, nodes in parallel); inprocess: the "
                        "same ServerApp and ClientApp in this process, nodes one after another, one model load "
                        "(quality sweeps on a small machine; not for timing)")
    p.add_argument("--cpus-per-client", type=int, default=1)
    p.add_argument("--gpus-per-client", type=float, default=None, help="default: 0.25 with CUDA, else 0")
    p.add_argument("--home", default=None, help="project-local state dir (default: ./.flwr under cwd)")


def run(args: argparse.Namespace) -> int:
    if args.num_clients < 1:
        raise ValueError(f"--num-clients must be >= 1, got {args.num_clients}")
    cfg = config_from_args(args)
    engine = preflight(cfg, args.num_clients)
    return ENGINES[args.engine](cfg, engine, federation(args, args.num_clients), home=args.home)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    given: dict[str, Any] = run_config.absolute_paths(run_config.overrides(args))
    own = sorted(OWN_KEYS & set(given))
    if own:
        raise ValueError(f"simulate sets {', '.join(own)} itself (use --num-clients)")
    given.setdefault("db-url", default_db_url())  # absolute: the ServerApp runs in another process
    if given.get("mlflow-uri"):  # likewise a local MLflow store
        given["mlflow-uri"] = absolute_uri(str(given["mlflow-uri"]))
    given.update({"simulation-nodes": args.num_clients, "run-tag": uuid.uuid4().hex[:16]})
    # Unset, every simulated node trains each round: with a topic split, sampling half the
    # nodes pulled the global model towards other topics each round and the demo got worse.
    given.setdefault("clients-per-round", args.num_clients)
    # More per round than there are clients: each round samples all of them. Say so, and
    # record (and print in the header) the number that really trains.
    asked = int(given["clients-per-round"])
    if asked > args.num_clients:
        console.print(f"[yellow]--clients-per-round {asked} > --num-clients {args.num_clients}: "
                      f"{args.num_clients} clients per round[/]")
        given["clients-per-round"] = args.num_clients
    return parse_run_config(given)


def federation(args: argparse.Namespace, nodes: int) -> dict[str, Any]:
    gpus = args.gpus_per_client if args.gpus_per_client is not None else _default_gpus()
    return {"num-supernodes": nodes, "client-resources-num-cpus": args.cpus_per_client,
            "client-resources-num-gpus": gpus}


def preflight(cfg: RunConfig, num_clients: int) -> Engine:
    """Fail before any training: database, data, partitioning, model, the aggregator's fit."""
    from core.presets import load_base  # torch and transformers: only when a run is checked
    from server.app import make_aggregator, model_spec

    engine = open_database(cfg.database_url)
    train, _ = split_heldout(load_examples(cfg.data), cfg.eval_fraction, cfg.seed)
    partition(train, cfg.partition, num_clients, cfg.seed)
    base = load_base(cfg.model)  # also builds the converted cache once, before clients race for it
    # e.g. rank vs module size; the ServerApp runs Fed-SB's calibration, not this check
    make_aggregator(cfg, base, calibrate=False).init_state(model_spec(cfg, base.model))
    if cfg.mlflow_uri:  # opens the store (and its experiment) now, naming the URI if it cannot
        MlflowSink(uri=cfg.mlflow_uri)
    if cfg.model == "tiny":
        console.print("[yellow]model 'tiny' is a smoke-test model: it learns nothing useful[/]")
    return engine


def run_on_simulation_engine(cfg: RunConfig, engine: Engine, federation: dict, *, home: str | None) -> int:
    flwr_home = _flwr_home(home)
    log_path = _log_path(cfg, home)
    _announce(cfg, federation["num-supernodes"])
    started = time.monotonic()
    run = None
    try:
        with LocalSuperLink(flwr_home=flwr_home, log_dir=flwr_home / "logs") as link:
            process = link.submit(APP_DIR, run_config=cfg.to_flower(), federation=federation, log_path=log_path)
            try:
                run = follow(engine, cfg.run_tag, process, cfg.num_server_rounds)
            finally:
                terminate_tree(process)
    except KeyboardInterrupt:
        _interrupted(engine, cfg)
        raise
    return summarize(engine, cfg, run, elapsed=time.monotonic() - started, log_path=log_path)


def run_in_process(cfg: RunConfig, engine: Engine, federation: dict, *, home: str | None) -> int:
    """The same run with ``cli.inprocess``: no SuperLink, nodes one after another in this process."""
    from cli.inprocess import AppThread

    log_path = _log_path(cfg, home)
    nodes = federation["num-supernodes"]
    _announce(cfg, nodes, engine_label="in-process")
    started = time.monotonic()
    app = AppThread(cfg.to_flower(), nodes, log_path=log_path)
    try:
        run = follow(engine, cfg.run_tag, app.start(), cfg.num_server_rounds)
    except KeyboardInterrupt:
        console.print("stopping: the node training now finishes its step, then the run is recorded as interrupted")
        app.stop()  # the ServerApp marks its row interrupted; a daemon thread, it ends with us regardless
        _interrupted(engine, cfg)
        raise
    return summarize(engine, cfg, run, elapsed=time.monotonic() - started, log_path=log_path)


def _flwr_home(home: str | None) -> Path:
    return Path(home or Path.cwd() / ".flwr").resolve()


def _log_path(cfg: RunConfig, home: str | None) -> Path:
    return _flwr_home(home) / "logs" / f"run-{cfg.run_tag}-{int(time.time())}.log"


def _announce(cfg: RunConfig, nodes: int, *, engine_label: str = "") -> None:
    verb = f"resuming run {cfg.resume_run_id}" if cfg.resume_run_id else "fedlora"
    where = f" | {engine_label}" if engine_label else ""
    console.print(f"[bold]{verb}[/] {cfg.aggregator} | model {cfg.model} | {nodes} clients "
                  f"({cfg.clients_per_round}/round) ranks {cfg.ranks} | {cfg.num_server_rounds} rounds{where}")
    plan = central_plan(cfg, nodes)
    if plan:
        console.print(plan, markup=False)


def _interrupted(engine: Engine, cfg: RunConfig) -> None:
    """Ctrl-C or SIGTERM: the engine is stopped by now; say so in the run's row too."""
    run = mark_interrupted(engine, cfg.run_tag, "stopped by the user (Ctrl-C or SIGTERM)", mlflow_uri=cfg.mlflow_uri)
    if run is not None:
        console.print(f"  continue it with: fedlora resume {run.id} --db '{masked(cfg.database_url)}'")


#: --engine: how a simulated run is carried out (the same ServerApp and ClientApp in both)
ENGINES = {"flower": run_on_simulation_engine, "inprocess": run_in_process}


def _default_gpus() -> float:
    import torch

    return 0.25 if torch.cuda.is_available() else 0.0

"""The ``fedlora`` console script.

  fedlora simulate [options]   run a federated simulation on Flower's simulation engine
  fedlora runs [--db URL]      list recorded runs

``simulate`` validates everything it can before a client trains (config, data, model,
database), then starts a project-local SuperLink, submits the app with ``flwr run``,
prints one table row per finished round from the database, and stops the SuperLink.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

import aggregation
from server.config import RunConfig, default_db_url
from server.db.models import ClientUpdateRecord, Evaluation, RoundRecord, Run
from server.db.session import DatabaseError, masked, open_database

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXIT_CLIENT_FAILURES = 3  # the run completed, but some sampled client failed or was rejected
console = Console(highlight=False, soft_wrap=True)


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="run a federated simulation (Flower simulation engine)")
    p.add_argument("--aggregator", default="fedavg", help=f"one of: {', '.join(aggregation.names())}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-clients", type=int, default=8, help="simulated nodes (SuperNodes)")
    p.add_argument("--clients-per-round", type=int, default=4)
    p.add_argument("--min-clients", type=int, default=1)
    p.add_argument("--ranks", default="4,8,16", help="LoRA rank per client, cycled over partition ids")
    p.add_argument("--max-rank", type=int, default=64)
    p.add_argument("--alpha", type=float, default=16.0, help="lora_alpha (same for every client)")
    p.add_argument("--target-modules", default="q_proj,v_proj")
    p.add_argument("--model", default="smollm2", help="'smollm2' (default), 'tiny' (smoke test), hub id or path")
    p.add_argument("--data", default="chatterbot", help="'chatterbot', a .jsonl file/dir, or hf:NAME")
    p.add_argument("--partition", default="topic", help="iid | dirichlet:ALPHA | topic | file")
    p.add_argument("--local-steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--eval-examples", type=int, default=64)
    p.add_argument("--db", default=None, help="SQLAlchemy URL (default: FEDLORA_DB_URL or runs/fedlora.db)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpus-per-client", type=int, default=1)
    p.add_argument("--gpus-per-client", type=float, default=None, help="default: 0.25 with CUDA, else 0")
    p.add_argument("--aggregator-options", default="", help="e.g. 'solver=paper,ridge=0.01' (lora-fair)")
    p.add_argument("--calibration-data", default="", help="fed-sb: public data for the LoRA-SB init")
    p.add_argument("--round-retries", type=int, default=1, help="re-sample when fewer than --min-clients reply")
    p.add_argument("--on-insufficient", default="stop", help="stop | skip, after the retries")
    p.add_argument("--checkpoint-dir", default="", help="default: runs/checkpoints")
    p.add_argument("--keep-checkpoints", type=int, default=3)
    dp = p.add_argument_group("differential privacy (README: 'Differential privacy'; 0 = off)")
    dp.add_argument("--dp-epsilon", type=float, default=0.0, help="per-client DP-SGD target ε (0: off)")
    dp.add_argument("--dp-delta", type=float, default=1e-5)
    dp.add_argument("--dp-max-grad-norm", type=float, default=1.0, help="per-example clipping bound")
    dp.add_argument("--dp-noise-multiplier", type=float, default=0.0, help="fixed σ (0: calibrated from ε)")
    dp.add_argument("--dp-accountant", default="prv", help="prv | rdp")
    dp.add_argument("--dp-on-budget", default="decline", help="decline | truncate, when ε would pass the target")
    dp.add_argument("--dp-grad-sample-mode", default="hooks", help="hooks | ghost | functorch")
    dp.add_argument("--dp-state-dir", default="", help="per-node privacy history (default .cache/privacy)")
    dp.add_argument("--dp-central-clip", type=float, default=0.0, help="central DP: per-client update clip")
    dp.add_argument("--dp-central-noise", type=float, default=0.0, help="central DP: noise multiplier")
    p.add_argument("--home", default=None, help="project-local state dir (default: ./.flwr under cwd)")


def simulate(args: argparse.Namespace) -> int:
    if args.num_clients < 1:
        raise ValueError(f"--num-clients must be >= 1, got {args.num_clients}")
    # More per round than there are clients: each round samples all of them. Say so, and
    # record (and print in the header) the number that really trains.
    per_round = min(args.clients_per_round, args.num_clients)
    if per_round < args.clients_per_round:
        console.print(f"[yellow]--clients-per-round {args.clients_per_round} > --num-clients {args.num_clients}: "
                      f"{per_round} clients per round[/]")
    cfg = RunConfig(
        aggregator=args.aggregator, num_server_rounds=args.rounds, clients_per_round=per_round,
        min_clients=args.min_clients, ranks=args.ranks, max_rank=args.max_rank, lora_alpha=args.alpha,
        target_modules=args.target_modules, learning_rate=args.lr, local_steps=args.local_steps,
        batch_size=args.batch_size, max_seq_len=args.max_seq_len, model=args.model, data=_abs_if_path(args.data),
        partition=args.partition, eval_examples=args.eval_examples, db_url=args.db or default_db_url(),
        seed=args.seed, run_tag=uuid.uuid4().hex[:16], aggregator_options=args.aggregator_options,
        simulation_nodes=args.num_clients, round_retries=args.round_retries, on_insufficient=args.on_insufficient,
        checkpoint_dir=args.checkpoint_dir, keep_checkpoints=args.keep_checkpoints,
        calibration_data=_abs_if_path(args.calibration_data) if args.calibration_data else "",
        dp_epsilon=args.dp_epsilon, dp_delta=args.dp_delta, dp_max_grad_norm=args.dp_max_grad_norm,
        dp_noise_multiplier=args.dp_noise_multiplier, dp_accountant=args.dp_accountant,
        dp_on_budget=args.dp_on_budget, dp_grad_sample_mode=args.dp_grad_sample_mode,
        dp_state_dir=str(Path(args.dp_state_dir).expanduser().resolve()) if args.dp_state_dir else "",
        dp_central_clip=args.dp_central_clip, dp_central_noise=args.dp_central_noise,
    )
    engine = preflight(cfg, args.num_clients)
    gpus = args.gpus_per_client if args.gpus_per_client is not None else _default_gpus()
    federation = {"num-supernodes": args.num_clients, "client-resources-num-cpus": args.cpus_per_client,
                  "client-resources-num-gpus": gpus}
    return run_on_simulation_engine(cfg, engine, federation, home=args.home)


def run_on_simulation_engine(cfg: RunConfig, engine: Engine, federation: dict, *, home: str | None) -> int:
    from server.simulation import LocalSuperLink, terminate_tree

    flwr_home = Path(home or Path.cwd() / ".flwr").resolve()
    log_path = flwr_home / "logs" / f"run-{cfg.run_tag}-{int(time.time())}.log"
    verb = f"resuming run {cfg.resume_run_id}" if cfg.resume_run_id else "fedlora"
    console.print(f"[bold]{verb}[/] {cfg.aggregator} | model {cfg.model} | {federation['num-supernodes']} clients "
                  f"({cfg.clients_per_round}/round) ranks {cfg.ranks} | {cfg.num_server_rounds} rounds")
    started = time.monotonic()
    run = None
    try:
        with LocalSuperLink(flwr_home=flwr_home, log_dir=flwr_home / "logs") as link:
            process = link.submit(PROJECT_ROOT, run_config=cfg.to_flower(), federation=federation, log_path=log_path)
            try:
                run = follow(engine, cfg.run_tag, process, cfg.num_server_rounds)
            finally:
                terminate_tree(process)
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM: the SuperLink is stopped by now; say so in the run's row too
        run = mark_interrupted(engine, cfg.run_tag, "stopped by the user (Ctrl-C or SIGTERM)")
        if run is not None:
            console.print(f"  continue it with: fedlora resume {run.id} --db '{masked(cfg.database_url)}'")
        raise
    return summarize(engine, cfg, run, elapsed=time.monotonic() - started, log_path=log_path)


def summarize(engine: Engine, cfg: RunConfig, run: Run | None, *, elapsed: float, log_path: Path) -> int:
    """The closing lines and exit status of a simulation, from what the database holds.

    0 only when the run completed and every sampled client trained or declined;
    EXIT_CLIENT_FAILURES when it completed over failed or rejected clients; 1 otherwise.
    """
    if run is not None and run.status == "running":
        run = mark_interrupted(engine, cfg.run_tag, "the coordinator process ended before the run finished")
    if run is None or run.status != "completed":
        status = run.status if run else "not started"
        console.print(f"[red]run {status}[/]: {run.error if run and run.error else 'see the log'}", markup=True)
        if run is not None and run.status == "interrupted":
            console.print(f"  continue it with: fedlora resume {run.id} --db '{masked(cfg.database_url)}'")
        console.print(f"Flower log: {log_path}")
        _tail(log_path)
        return 1
    failures = failed_clients(engine, run.id)
    if failures:
        # every round finished, but some sampled node did not train what it was sent: not "done"
        console.print(f"\n[red]completed with {failures} failed client "
                      f"{'reply' if failures == 1 else 'replies'}[/] in {elapsed:.0f} s (listed under their "
                      f"rounds above). run id {run.id} (Flower run {run.flwr_run_id})")
    else:
        console.print(f"\n[green]done[/] in {elapsed:.0f} s. run id {run.id} (Flower run {run.flwr_run_id})")
    console.print(f"  database: {masked(cfg.database_url)}")
    from server.recording import RunRecorder  # the run's directory is keyed by its uuid, held in the DB

    console.print(f"  checkpoints: {RunRecorder(engine).checkpoint_directory(run.id, cfg.checkpoint_path)}")
    console.print(f"  Flower log: {log_path}")
    console.print(f"  list runs: fedlora runs --db '{masked(cfg.database_url)}'")
    from privacy.report import max_epsilon

    dp_summary = max_epsilon(engine, run.id)
    if dp_summary is not None:  # some client ran DP-SGD
        console.print(f"  DP: max ε across clients {dp_summary.epsilon:.4g} at δ = {dp_summary.delta:g} "
                      f"({dp_summary.clients} clients)")
    return EXIT_CLIENT_FAILURES if failures else 0


def resume(args: argparse.Namespace) -> int:
    """Continue a run from its last checkpoint, on the simulation engine, same config."""
    from server import checkpoint as ckpt
    from server.recording import latest_checkpoint_row

    url = args.db or default_db_url()
    engine = open_database(url, create=False)  # the run must be there: a mistyped path is not a new DB
    with Session(engine) as session:
        run = session.get(Run, args.run_id)
        if run is None:
            raise ValueError(f"run {args.run_id} is not in {masked(url)}")
        if run.status == "completed":
            raise ValueError(f"run {args.run_id} is completed; nothing to resume")
        if run.status == "running" and not args.force:
            raise ValueError(
                f"run {args.run_id} is marked running (last update {run.updated_at:%Y-%m-%d %H:%M:%S} UTC); "
                "if its coordinator died without recording it (SIGKILL, power loss), resume with --force"
            )
        config = dict(run.config)
        latest = latest_checkpoint_row(session, args.run_id)
    if latest is not None:
        # the rounds so far ran with the checkpoint's config: an edited row must not continue
        # them under another one, and is refused before anything starts (the ServerApp checks again)
        ckpt.check_resumable(ckpt.load(Path(latest.path), latest.sha256), config, run_id=args.run_id,
                             path=Path(latest.path), source=f"its config in {masked(url)}")
    config.update({"resume-run-id": args.run_id, "db-url": url})
    cfg = RunConfig.from_flower(config)
    nodes = cfg.simulation_nodes
    if nodes < 1:
        raise ValueError(f"run {args.run_id} was not a simulation (no simulation-nodes recorded); "
                         "resume deployment runs by submitting with resume-run-id")
    federation = {"num-supernodes": nodes, "client-resources-num-cpus": args.cpus_per_client,
                  "client-resources-num-gpus": _default_gpus()}
    return run_on_simulation_engine(cfg, engine, federation, home=args.home)


def preflight(cfg: RunConfig, num_clients: int) -> Engine:
    """Fail before any training: database, data, partitioning, model."""
    from client.data import load_examples, partition, split_heldout
    from client.presets import load_base

    engine = open_database(cfg.database_url)
    train, _ = split_heldout(load_examples(cfg.data), cfg.eval_fraction, cfg.seed)
    partition(train, cfg.partition, num_clients, cfg.seed)
    base = load_base(cfg.model)  # also builds the converted cache once, before clients race for it
    from server.app import make_aggregator, model_spec

    make_aggregator(cfg, base).init_state(model_spec(cfg, base.model))  # e.g. rank vs module size
    if cfg.model == "tiny":
        console.print("[yellow]model 'tiny' is a smoke-test model: it learns nothing useful[/]")
    return engine


def mark_interrupted(engine: Engine, tag: str, reason: str) -> Run | None:
    """Record that the run with ``tag`` stopped mid-way (resumable); a finished run is left as it is."""
    from server.recording import RunRecorder

    with Session(engine) as session:
        run = session.scalar(select(Run).where(Run.tag == tag))
        if run is not None and run.status == "running":
            RunRecorder(engine).finish_run(run.id, status="interrupted", error=reason)
            session.refresh(run)
        if run is not None:
            session.expunge(run)
    return run


def follow(engine: Engine, tag: str, process, rounds: int) -> Run | None:
    """Print a row per finished round until the Flower process exits."""
    printed = 0
    header = False
    last = time.monotonic()
    while True:
        done = process.poll() is not None
        with Session(engine) as session:
            run = session.scalar(select(Run).where(Run.tag == tag))
            if run is not None:
                for row in round_rows(session, run.id)[printed:]:
                    if not header:
                        console.print(f"{'round':>7} {'clients':>8} {'train loss':>11} {'eval loss':>10} "
                                      f"{'eval ppl':>9} {'rel.err':>8} {'MB down':>8} {'MB up':>7} {'sec':>6}")
                        header = True
                    console.print(row, markup=False)  # a node's reason may hold [brackets]
                    printed += 1
                    last = time.monotonic()
                session.expunge_all()
        if done:
            return run
        if run is not None and time.monotonic() - last > 30 and printed < rounds:
            console.print(f"  ... round {printed + 1}/{rounds} running", style="dim")
            last = time.monotonic()
        time.sleep(1.0)


def round_rows(session: Session, run_id: int) -> list[str]:
    """One line per recorded round, then one line per client that did not train ("ok")."""
    rounds = session.scalars(select(RoundRecord).where(RoundRecord.run_id == run_id).order_by(RoundRecord.number)).all()
    evals = {e.round_number: e for e in session.scalars(select(Evaluation).where(Evaluation.run_id == run_id))}
    not_ok: dict[int, list[ClientUpdateRecord]] = {}
    for c in session.scalars(select(ClientUpdateRecord).where(ClientUpdateRecord.run_id == run_id,
                                                              ClientUpdateRecord.status != "ok")
                             .order_by(ClientUpdateRecord.id)):
        not_ok.setdefault(c.round_id, []).append(c)
    rows = []
    for r in rounds:
        ev = evals.get(r.number)
        row = (
            f"{r.number:>7} {f'{r.num_aggregated}/{r.num_sampled}':>8} {_fmt(r.train_loss):>11} "
            f"{_fmt(ev.loss if ev else None):>10} {_fmt(ev.perplexity if ev else None, 2):>9} "
            f"{_fmt(r.relative_error, 3):>8} {r.bytes_down / 1e6:>8.2f} {r.bytes_up / 1e6:>7.2f} "
            f"{(r.finished_at - r.started_at).total_seconds():>6.1f}"
        )
        for c in not_ok.get(r.id, []):
            reason = " ".join((c.reason or "no reason given").split())  # one line, whatever the node sent
            row += f"\n{'':>9}node {c.node_id} (rank {c.rank if c.rank is not None else '?'}): {c.status}: {reason}"
        rows.append(row)
    return rows


#: client statuses that mean a sampled node did not do what it was asked: the run's
#: record holds them, and ``simulate`` must not report a clean success over them
FAILED_STATUSES = ("failed", "rejected")


def failed_clients(engine: Engine, run_id: int) -> int:
    with Session(engine) as session:
        rows = session.scalars(select(ClientUpdateRecord.id).where(
            ClientUpdateRecord.run_id == run_id, ClientUpdateRecord.status.in_(FAILED_STATUSES))).all()
    return len(rows)


def runs(args: argparse.Namespace) -> int:
    engine = open_database(args.db or default_db_url(), create=False, write=False)  # a typo is not a new DB
    table = Table(title=f"runs in {masked(args.db or default_db_url())}")
    for col in ("id", "aggregator", "model", "status", "rounds", "final eval ppl", "started"):
        table.add_column(col)
    with Session(engine) as session:
        for run in session.scalars(select(Run).order_by(Run.id)):
            ev = session.scalars(
                select(Evaluation).where(Evaluation.run_id == run.id).order_by(Evaluation.round_number.desc())
            ).first()
            table.add_row(str(run.id), run.aggregator, run.model, run.status, str(len(run.rounds)),
                          _fmt(ev.perplexity if ev else None, 2), run.started_at.strftime("%Y-%m-%d %H:%M"))
    console.print(table)
    return 0


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _abs_if_path(data: str) -> str:
    path = Path(data).expanduser()
    return str(path.resolve()) if path.exists() else data


def _default_gpus() -> float:
    import torch

    return 0.25 if torch.cuda.is_available() else 0.0


def _tail(path: Path, lines: int = 25) -> None:
    if path.exists():
        for line in path.read_text(errors="replace").splitlines()[-lines:]:
            console.print(f"  | {line}", markup=False)


Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Callable[[argparse._SubParsersAction], None], Handler]] = {}


def register_command(name: str, add_arguments: Callable[[argparse._SubParsersAction], None], handler: Handler) -> None:
    """Add a sub-command; other modules (deployment, reports) register theirs here."""
    if name in _COMMANDS:
        raise ValueError(f"CLI command {name!r} is already registered")
    _COMMANDS[name] = (add_arguments, handler)


def _add_runs(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("runs", help="list recorded runs")
    r.add_argument("--db", default=None)


register_command("simulate", _add_simulate, simulate)
register_command("runs", _add_runs, runs)


def _add_resume(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("resume", help="continue an interrupted or failed simulation run from its last round")
    r.add_argument("run_id", type=int)
    r.add_argument("--db", default=None)
    r.add_argument("--cpus-per-client", type=int, default=1)
    r.add_argument("--home", default=None)
    r.add_argument("--force", action="store_true", help="resume a run still marked running (its coordinator died)")


register_command("resume", _add_resume, resume)
# Modules that add commands (imported for their register_command calls).
_COMMAND_MODULES: tuple[str, ...] = ("server.deploy", "server.export", "server.report")


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: unwind like Ctrl-C, so every ``finally`` stops what we started."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    # docker stop, a CI cancel or `kill` send SIGTERM, whose default action ends Python
    # without running finally blocks: the SuperLink and Ray we started would be orphaned.
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    for module in _COMMAND_MODULES:
        importlib.import_module(module)
    parser = argparse.ArgumentParser(prog="fedlora", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    for add_arguments, _ in _COMMANDS.values():
        add_arguments(sub)
    args = parser.parse_args(argv)
    try:
        with sigterm_as_interrupt():
            return _COMMANDS[args.command][1](args)
    except (ValueError, FileNotFoundError, DatabaseError, ModuleNotFoundError) as exc:
        console.print(f"error: {exc}", style="red", markup=False)
        return 2
    except Terminated:
        console.print("[yellow]terminated[/]")
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


if __name__ == "__main__":
    # `python -m server.cli`: run the importable module's main, whose command registry
    # is the one the plug-in modules (deploy, export, report) register into
    from server import cli as _cli

    sys.exit(_cli.main())

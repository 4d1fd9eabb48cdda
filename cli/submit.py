"""``fedlora run``: submit the app to a running coordinator, from its machine (the Control API).

The run config is checked here first (``privacy.settings.parse_run_config``: every key,
dp-* included), then ``flwr run`` submits it over the coordinator's loopback Control API
(or an SSH tunnel to it), the run's log is streamed, and the exit status is 0 only when
Flower reports the run completed.
"""

from __future__ import annotations

import argparse
import tomllib
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from cli import APP_DIR
from cli.certs import probe
from cli.console import console
from cli.flower import (
    OPERATOR_PORT, Daemon, add_connection_args, connection_ca, flower_env, flwr_json, reported,
    run_flwr, write_connection, write_toml,
)
from cli.local_superlink import flower_bin
from cli.progress import EXIT_CLIENT_FAILURES, HEADER, round_rows, watch
from cli.run_config import parse_assignment
from privacy.settings import parse_run_config
from server.db import read
from server.db.session import masked, open_database

SUBMIT_TIMEOUT = 300.0  # building and uploading the app bundle


def add_run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="submit a run of the app to a running coordinator (from its machine)")
    add_connection_args(p, port=OPERATOR_PORT)  # the Control API: loopback (or an SSH tunnel to it)
    p.add_argument("--db", default=None, help="round-log database URL for this run (default: the coordinator's)")
    p.add_argument("--rounds", type=int, default=None, help="num-server-rounds")
    p.add_argument("--aggregator", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any run-config key, e.g. --set model=tiny --set ranks=4,8 (repeatable)")
    p.add_argument("--app", default=str(APP_DIR), help="the Flower app directory (default: this project)")
    p.add_argument("--home", default=".flwr/cli", help="Flower home for the flwr CLI (connection config)")
    p.add_argument("--detach", action="store_true", help="submit and return; do not stream the run's log")


@reported
def run(args: argparse.Namespace) -> int:
    overrides = run_overrides(args)
    app = Path(args.app).expanduser().resolve()
    cfg = parse_run_config({**app_defaults(app), **overrides})  # bad keys/values: named, before submitting
    ca = connection_ca(args)
    probe(args.coordinator, ca=ca, tls=not args.insecure)
    home = Path(args.home).expanduser().resolve()
    connection = write_connection(home, address=args.coordinator, ca=ca)
    config_file = write_toml(home / "runs" / f"{overrides['run-tag']}.toml", overrides)

    result = run_flwr(["run", str(app), connection, "--run-config", str(config_file), "--format", "json"],
                      home=home, timeout=SUBMIT_TIMEOUT)
    reply = _succeeded(result, "flwr run")
    run_id = reply["run-id"]
    console.print(f"submitted run {run_id} (tag {overrides['run-tag']}) to {args.coordinator}", markup=False)
    if args.detach:
        console.print(f"follow it: FLWR_HOME={home} flwr log {run_id} {connection}", markup=False)
        return 0
    log_command = [flower_bin("flwr"), "log", str(run_id), connection, "--stream"]
    live = bool(args.db) and console.is_terminal  # the record is readable here: live progress, the log to a file
    if live:
        watch(args.db, overrides["run-tag"], log_command, env=flower_env(home), rounds=cfg.num_server_rounds,
              log_path=home / "logs" / f"run-{run_id}.log")
    else:
        stream = Daemon(command=log_command, env=flower_env(home))
        stream.start()
        stream.wait()
    status = _succeeded(run_flwr(["ls", connection, "--run-id", str(run_id), "--format", "json"],
                                  home=home, timeout=60), "flwr ls")["runs"][0]
    if status["status"] != "finished:completed":
        console.print(f"run {run_id} {status['status']}: {status.get('status-details', '')}", style="red", markup=False)
        return 1
    if args.db:  # the run's record is readable here: its clients decide the exit status too
        return client_outcome(args.db, overrides["run-tag"], run_id, print_rows=not live)
    console.print(f"run {run_id} completed; rounds: fedlora runs --db <the coordinator's database>", markup=False)
    return 0


def client_outcome(db_url: str, tag: str, run_id: int, *, print_rows: bool = True) -> int:
    """Print the run's rounds from its record; EXIT_CLIENT_FAILURES when a client failed or was rejected.

    Flower says "completed" when the ServerApp returned, whatever its clients did; the
    record says what each sampled client did, as ``simulate``'s closing lines do.
    """
    engine = open_database(db_url, create=False, write=False)
    with Session(engine) as session:
        row = read.run_by_tag(session, tag)
        if row is None:
            raise RuntimeError(f"run {run_id} completed but {masked(db_url)} holds no run tagged {tag}")
        if print_rows:  # not again after the live display printed them
            console.print(HEADER)
            for line in round_rows(session, row.id):
                console.print(line, markup=False)
        record_id = row.id
    failures = read.failed_clients(engine, record_id)
    if failures:
        console.print(f"run {run_id} completed with {failures} failed client "
                      f"{'reply' if failures == 1 else 'replies'} (listed above); record {record_id} in "
                      f"{masked(db_url)}", style="red", markup=False)
        return EXIT_CLIENT_FAILURES
    console.print(f"run {run_id} completed; rounds: fedlora runs --db '{masked(db_url)}'", markup=False)
    return 0


def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    pairs = [parse_assignment(text, option="--set") for text in args.overrides]
    overrides: dict[str, Any] = dict(pairs)
    named = {"num-server-rounds": args.rounds, "aggregator": args.aggregator, "db-url": args.db}
    overrides.update({key: value for key, value in named.items() if value is not None})
    overrides.setdefault("run-tag", uuid.uuid4().hex[:16])
    return overrides


def app_defaults(app: Path) -> dict[str, Any]:
    pyproject = app / "pyproject.toml"
    if not pyproject.is_file():
        raise FileNotFoundError(f"app directory {str(app)!r} has no pyproject.toml")
    return tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"].get("config", {})


def _succeeded(result: Any, what: str) -> dict[str, Any]:
    reply = flwr_json(result, what)
    if not reply.get("success"):
        raise RuntimeError(f"{what} failed: {reply.get('error-message', reply)}")
    return reply

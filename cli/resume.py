"""``fedlora resume RUN_ID``: continue a simulation run from its last checkpoint, same config."""

from __future__ import annotations

import argparse
from pathlib import Path

from sqlalchemy.orm import Session

from cli import simulate
from core.config import default_db_url
from privacy.settings import parse_run_config
from server import checkpoint as ckpt
from server.db.models import Run
from server.db.session import masked, open_database
from server.recording import latest_checkpoint_row


def add_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("resume", help="continue an interrupted or failed simulation run from its last round")
    r.add_argument("run_id", type=int)
    r.add_argument("--db", default=None)
    r.add_argument("--force", action="store_true", help="resume a run still marked running (its coordinator died)")
    simulate.add_engine_flags(r)


def run(args: argparse.Namespace) -> int:
    url = args.db or default_db_url()
    engine = open_database(url, create=False)  # the run must be there: a mistyped path is not a new DB
    with Session(engine) as session:
        row = session.get(Run, args.run_id)
        if row is None:
            raise ValueError(f"run {args.run_id} is not in {masked(url)}")
        if row.status == "completed":
            raise ValueError(f"run {args.run_id} is completed; nothing to resume")
        if row.status == "stopped":  # only a spent central-DP budget stops a run (server.app)
            raise ValueError(f"run {args.run_id} stopped: {row.error}. Resuming it would stop again before its "
                             "next round: a resumed run keeps its config, dp-central-epsilon included")
        if row.status == "running" and not args.force:
            raise ValueError(
                f"run {args.run_id} is marked running (last update {row.updated_at:%Y-%m-%d %H:%M:%S} UTC); "
                "if its coordinator died without recording it (SIGKILL, power loss), resume with --force"
            )
        config = dict(row.config)
        latest = latest_checkpoint_row(session, args.run_id)
    if latest is not None:
        # the rounds so far ran with the checkpoint's config: an edited row must not continue
        # them under another one, and is refused before anything starts (the ServerApp checks again)
        ckpt.check_resumable(ckpt.load(Path(latest.path), latest.sha256), config, run_id=args.run_id,
                             path=Path(latest.path), source=f"its config in {masked(url)}")
    config.update({"resume-run-id": args.run_id, "db-url": url})
    cfg = parse_run_config(config)
    if cfg.simulation_nodes < 1:
        raise ValueError(f"run {args.run_id} was not a simulation (no simulation-nodes recorded); "
                         "resume deployment runs by submitting with resume-run-id")
    return simulate.ENGINES[args.engine](cfg, engine, simulate.federation(args, cfg.simulation_nodes),
                                         home=args.home)

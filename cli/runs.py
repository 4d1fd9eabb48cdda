"""``fedlora runs``: the recorded runs of a database, one row each."""

from __future__ import annotations

import argparse

from rich.table import Table
from sqlalchemy.orm import Session

from cli.console import console, fmt
from core.config import default_db_url
from server.db import read
from server.db.session import masked, open_database


def add_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("runs", help="list recorded runs")
    r.add_argument("--db", default=None)


def run(args: argparse.Namespace) -> int:
    url = args.db or default_db_url()
    engine = open_database(url, create=False, write=False)  # a typo is not a new DB
    table = Table(title=f"runs in {masked(url)}")
    for col in ("id", "aggregator", "model", "status", "rounds", "final eval ppl", "started"):
        table.add_column(col)
    with Session(engine) as session:
        for row in read.all_runs(session):
            evals = read.evaluations(session, row.id)
            table.add_row(str(row.id), row.aggregator, row.model, row.status, str(len(read.rounds(session, row.id))),
                          fmt(evals[-1].perplexity if evals else None, 2), row.started_at.strftime("%Y-%m-%d %H:%M"))
    console.print(table)
    return 0

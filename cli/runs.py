"""``fedlora runs``: the recorded runs of a database, one row each."""

from __future__ import annotations

import argparse

from sqlalchemy.orm import Session

from cli.console import compact_table, console, fmt
from core.config import default_db_url
from server.db import read
from server.federated_report import FEDERATED_COLUMNS, FEDERATED_LEGEND, federated_row, load_federated
from server.db.session import masked, open_database


#: short headers: an 80-column terminal shows each of them whole
RUNS_COLUMNS = ("id", "aggregator", "model", "status", "rounds", "eval ppl", "central ε", "started")
# central ε: the user-level ε central DP spent (per-client DP-SGD ε is in `report`)
RUNS_LEGEND = ("eval ppl: held-out perplexity after the last evaluated round (F: the nodes' federated evaluation, "
               "for a run without server-side evaluation); central ε: the user-level ε central DP spent (each "
               "client's DP-SGD ε: fedlora report); started: month-day time")


def add_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("runs", help="list recorded runs")
    r.add_argument("--db", default=None)


def run(args: argparse.Namespace) -> int:
    url = args.db or default_db_url()
    engine = open_database(url, create=False, write=False)  # a typo is not a new DB
    # model (a hub id or a path: free text) folds before any header is cut at 80 columns
    table = compact_table(f"runs in {masked(url)}", RUNS_COLUMNS, fold={"model"})
    # federated evaluation: each run's last evaluated round, the aggregate beside the spread across nodes
    federated = compact_table("federated evaluation (each run's last evaluated round)", ("id", *FEDERATED_COLUMNS),
                              fold={"worst node"})
    with Session(engine) as session:
        for row in read.all_runs(session):
            rounds, _ = load_federated(session, row.id)
            if rounds:
                federated.add_row(str(row.id), *federated_row(rounds[-1]))
            evals = read.evaluations(session, row.id)
            table.add_row(str(row.id), row.aggregator, row.model, row.status, str(len(read.rounds(session, row.id))),
                          _eval_ppl(evals[-1].perplexity if evals else None, rounds),
                          fmt(read.central_epsilon(session, row.id), 3), row.started_at.strftime("%m-%d %H:%M"))
    console.print(table)
    console.print(RUNS_LEGEND, style="dim", markup=False, soft_wrap=False)
    if federated.row_count:
        console.print(federated)
        console.print(FEDERATED_LEGEND, style="dim", markup=False, soft_wrap=False)
    return 0


def _eval_ppl(server: float | None, federated: list) -> str:
    """The server's held-out perplexity; without one, the nodes' last federated aggregate, marked F."""
    if server is not None:
        return fmt(server, 2)
    last = next((r.perplexity for r in reversed(federated) if r.perplexity is not None), None)
    return f"{fmt(last, 2)} F" if last is not None else "-"

"""``fedlora report RUN_ID [RUN_ID ...]``: summary table, PNG plots and an HTML page."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.console import compact_table, console
from core.config import default_db_url
from server.federated_report import FEDERATED_COLUMNS, FEDERATED_LEGEND, federated_row
from server.report import SUMMARY_COLUMNS, SUMMARY_LEGEND, build_report, summary_row


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="summary table, PNG plots and an HTML page for one or more runs")
    p.add_argument("run_ids", type=int, nargs="+")
    p.add_argument("--out", type=Path, default=None, help="default: runs/report-<ids>")
    p.add_argument("--db", default=None)


def run(args: argparse.Namespace) -> int:
    out = args.out or Path("runs") / f"report-{'-'.join(map(str, args.run_ids))}"
    series, page = build_report(args.db or default_db_url(), args.run_ids, out)
    # status folds ("interrupted") before any header is cut, on an 80-column terminal
    table = compact_table("fedlora runs", SUMMARY_COLUMNS, fold={"status"})
    for s in series:
        table.add_row(*summary_row(s))
    console.print(table)
    console.print(SUMMARY_LEGEND, style="dim", markup=False, soft_wrap=False)
    for s in series:
        if s.init is not None:  # which Fed-SB a run was: LoRA-SB from public data, from the nodes, or random
            console.print(f"{s.label}: {s.init.describe()}", markup=False)
    federated = [s for s in series if s.federated]
    for s in federated:  # per evaluated round: the aggregate beside the spread, so a failed node shows
        # the worst node's key is free text: it folds before any header is cut
        table = compact_table(f"{s.label}: federated evaluation", FEDERATED_COLUMNS, fold={"worst node"})
        for f in s.federated:
            table.add_row(*federated_row(f))
        console.print(table)
    if federated:
        console.print(FEDERATED_LEGEND, style="dim", markup=False, soft_wrap=False)
    console.print(f"plots and HTML report: {page}")
    return 0

"""``fedlora export RUN_ID --out DIR``: a run's global model as a PEFT adapter or a merged model."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.console import console
from core.config import default_db_url
from server.export import export_run


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a run's global model as a PEFT adapter (or merged model)")
    p.add_argument("run_id", type=int)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--db", default=None)
    p.add_argument("--rank", type=int, default=None, help="truncate by SVD to this rank (default: exact)")
    p.add_argument("--merged", action="store_true", help="save the base model with the update folded in")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out (same-named files are replaced)")


def run(args: argparse.Namespace) -> int:
    result = export_run(args.db or default_db_url(), args.run_id, args.out, rank=args.rank, merged=args.merged,
                        force=args.force)
    if result.kind == "merged":
        console.print(f"merged model written to {result.path}")
    else:
        console.print(f"PEFT LoRA adapter (rank {result.rank}) written to {result.path}")
        console.print(f"relative approximation error ||exported - accumulated||_F / ||accumulated||_F: "
                      f"{result.relative_error:.6f}" + (" (exact)" if result.relative_error == 0 else ""))
    return 0

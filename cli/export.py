"""``fedlora export RUN_ID --out DIR``: a run's global model as a PEFT adapter or a merged model.

The directory loads by name (``AutoPeftModelForCausalLM.from_pretrained(DIR)``) and holds a
model card (``README.md``) saying which run produced it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.console import console
from core.config import default_db_url


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a run's global model as a PEFT adapter (or merged model)")
    p.add_argument("run_id", type=int)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--db", default=None)
    p.add_argument("--rank", type=int, default=None, help="truncate by SVD to this rank (default: exact)")
    p.add_argument("--merged", action="store_true", help="save the base model with the update folded in")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out (same-named files are replaced)")
    p.add_argument("--node", default=None, help="one node's personalised adapter (fedsa-lora), on that node's machine")
    p.add_argument("--personal-dir", type=Path, default=None,
                   help="where the node keeps its personal factors (default: <cache>/personal)")


def run(args: argparse.Namespace) -> int:
    from server.export import export_run  # torch, transformers and PEFT: only for this command
    from server.personal_export import export_personal

    if args.node is not None:
        if args.rank is not None or args.merged:
            raise ValueError("--node exports one node's adapter exactly; --rank and --merged do not apply")
        mine = export_personal(args.db or default_db_url(), args.run_id, args.node, args.out,
                               directory=args.personal_dir, force=args.force)
        console.print(f"personalised PEFT LoRA adapter of node {args.node} (rank {mine.rank}) written to {mine.path}",
                      markup=False)
        return 0
    result = export_run(args.db or default_db_url(), args.run_id, args.out, rank=args.rank, merged=args.merged,
                        force=args.force)
    if result.kind == "merged":
        console.print(f"merged model written to {result.path}")
    else:
        console.print(f"PEFT LoRA adapter (rank {result.rank}, the rank its weights use) written to {result.path}")
        console.print(f"relative approximation error ||exported - accumulated||_F / ||accumulated||_F: "
                      f"{result.relative_error:.6f}" + (" (exact)" if result.relative_error == 0 else ""))
        console.print(f"base model: {result.base_model}; load it with "
                      f"AutoPeftModelForCausalLM.from_pretrained({str(result.path)!r})", markup=False)
    console.print(f"model card: {result.path / 'README.md'}")
    return 0

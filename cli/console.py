"""The one console every command prints to, and the small formatting helpers they share."""

from __future__ import annotations

from pathlib import Path

from collections.abc import Collection, Sequence

from rich import box
from rich.console import Console
from rich.table import Table

console = Console(highlight=False, soft_wrap=True)


def fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def compact_table(title: str, headers: Sequence[str], *, fold: Collection[str] = ()) -> Table:
    """A rich table that keeps every header whole on an 80-column terminal.

    No vertical rules or edges and collapsed padding (two spaces between columns, not
    three plus a rule); each column at least as wide as its header and never wrapped, except the
    ``fold`` columns (free text such as a model path), whose values fold onto more lines
    when the row would not fit. Short headers want a legend: print it after the table
    (``soft_wrap=False``); as a rich caption its last word was cut at 80 columns, not wrapped.
    """
    table = Table(title=title, box=box.SIMPLE_HEAD,
                  collapse_padding=True, pad_edge=False, show_edge=False)
    for header in headers:
        folds = header in fold
        table.add_column(header, min_width=len(header), no_wrap=not folds, overflow="fold" if folds else "ellipsis")
    return table


def print_tail(path: Path, lines: int = 25) -> None:
    """The last lines of a log, indented, without rich markup (logs hold [brackets])."""
    if path.exists():
        for line in path.read_text(errors="replace").splitlines()[-lines:]:
            console.print(f"  | {line}", markup=False)

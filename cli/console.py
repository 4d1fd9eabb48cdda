"""The one console every command prints to, and the small formatting helpers they share."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

console = Console(highlight=False, soft_wrap=True)


def fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_tail(path: Path, lines: int = 25) -> None:
    """The last lines of a log, indented, without rich markup (logs hold [brackets])."""
    if path.exists():
        for line in path.read_text(errors="replace").splitlines()[-lines:]:
            console.print(f"  | {line}", markup=False)

"""The ``fedlora`` console script: an explicit table of commands (as ``flwr/cli/app.py``).

  fedlora simulate | resume         federated runs on Flower's simulation engine
  fedlora runs | report | export    what the round log holds
  fedlora coordinator | run         the coordinator side of a deployment
  fedlora client                    a client node of a deployment

Every command module offers ``add_parser(subparsers)`` and ``run(args) -> exit status``.
Errors a user can fix (a bad value, a missing file, an unreachable database) print one
line and exit 2; Ctrl-C exits 130, SIGTERM 143.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
from collections.abc import Callable, Iterator, Sequence

from cli import client, coordinator, export, report, resume, runs, simulate, submit
from cli.console import console
from server.db.session import DatabaseError


Command = tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], int]]

#: command name -> (add its parser, run it); the order is the order of ``fedlora --help``
COMMANDS: dict[str, Command] = {
    "simulate": (simulate.add_parser, simulate.run),
    "resume": (resume.add_parser, resume.run),
    "runs": (runs.add_parser, runs.run),
    "report": (report.add_parser, report.run),
    "export": (export.add_parser, export.run),
    "coordinator": (coordinator.add_coordinator_parser, coordinator.coordinator),
    "run": (submit.add_run_parser, submit.run),
    "client": (client.add_parser, client.client),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    for add_parser, _ in COMMANDS.values():
        add_parser(sub)
    return parser


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
    args = build_parser().parse_args(argv)
    try:
        with sigterm_as_interrupt():
            return COMMANDS[args.command][1](args)
    except (ValueError, FileNotFoundError, DatabaseError, ModuleNotFoundError) as exc:
        console.print(f"error: {exc}", style="red", markup=False)
        return 2
    except Terminated:
        console.print("[yellow]terminated[/]")
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130

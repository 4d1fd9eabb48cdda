"""What ``simulate`` and ``resume`` print while a run goes and when it ends, from the database.

A row per finished round, a line under it for every client that did not train, and a
closing summary whose exit status says what the record says: 0 only when the run
completed and every sampled client trained or declined.
"""

from __future__ import annotations

import time
from pathlib import Path
from subprocess import Popen

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from cli.console import console, fmt, print_tail
from core.config import RunConfig
from server.db import read
from server.db.models import Run
from server.db.session import masked
from server.recording import RunRecorder

EXIT_CLIENT_FAILURES = 3  # the run completed, but some sampled client failed or was rejected
HEADER = (f"{'round':>7} {'clients':>8} {'train loss':>11} {'eval loss':>10} {'eval ppl':>9} {'rel.err':>8} "
          f"{'MB down':>8} {'MB up':>7} {'sec':>6}")


def follow(engine: Engine, tag: str, process: Popen[bytes], rounds: int) -> Run | None:
    """Print a row per finished round until the Flower process exits."""
    printed = 0
    header = False
    last = time.monotonic()
    while True:
        done = process.poll() is not None
        with Session(engine) as session:
            run = read.run_by_tag(session, tag)
            if run is not None:
                for row in round_rows(session, run.id)[printed:]:
                    if not header:
                        console.print(HEADER)
                        header = True
                    console.print(row, markup=False)  # a node's reason may hold [brackets]
                    printed += 1
                    last = time.monotonic()
                session.expunge_all()
        if done:
            return run
        if run is not None and time.monotonic() - last > 30 and printed < rounds:
            console.print(f"  ... round {printed + 1}/{rounds} running", style="dim")
            last = time.monotonic()
        time.sleep(1.0)


def round_rows(session: Session, run_id: int) -> list[str]:
    """One line per recorded round, then one line per client that did not train ("ok")."""
    evals = {e.round_number: e for e in read.evaluations(session, run_id)}
    not_ok: dict[int, list] = {}
    for c in read.client_updates(session, run_id):
        if c.status != "ok":
            not_ok.setdefault(c.round_id, []).append(c)
    rows = []
    for r in read.rounds(session, run_id):
        ev = evals.get(r.number)
        row = (
            f"{r.number:>7} {f'{r.num_aggregated}/{r.num_sampled}':>8} {fmt(r.train_loss):>11} "
            f"{fmt(ev.loss if ev else None):>10} {fmt(ev.perplexity if ev else None, 2):>9} "
            f"{fmt(r.relative_error, 3):>8} {r.bytes_down / 1e6:>8.2f} {r.bytes_up / 1e6:>7.2f} "
            f"{(r.finished_at - r.started_at).total_seconds():>6.1f}"
        )
        for c in not_ok.get(r.id, []):
            reason = " ".join((c.reason or "no reason given").split())  # one line, whatever the node sent
            row += f"\n{'':>9}node {c.node_id} (rank {c.rank if c.rank is not None else '?'}): {c.status}: {reason}"
        rows.append(row)
    return rows


def mark_interrupted(engine: Engine, tag: str, reason: str) -> Run | None:
    """Record that the run with ``tag`` stopped mid-way (resumable); a finished run is left as it is."""
    with Session(engine) as session:
        run = read.run_by_tag(session, tag)
        if run is not None and run.status == "running":
            RunRecorder(engine).finish_run(run.id, status="interrupted", error=reason)
            session.refresh(run)
        if run is not None:
            session.expunge(run)
    return run


def summarize(engine: Engine, cfg: RunConfig, run: Run | None, *, elapsed: float, log_path: Path) -> int:
    """The closing lines and exit status of a simulation, from what the database holds.

    0 only when the run completed and every sampled client trained or declined;
    EXIT_CLIENT_FAILURES when it completed over failed or rejected clients; 1 otherwise.
    """
    if run is not None and run.status == "running":
        run = mark_interrupted(engine, cfg.run_tag, "the coordinator process ended before the run finished")
    if run is None or run.status != "completed":
        status = run.status if run else "not started"
        console.print(f"[red]run {status}[/]: {run.error if run and run.error else 'see the log'}", markup=True)
        if run is not None and run.status == "interrupted":
            console.print(f"  continue it with: fedlora resume {run.id} --db '{masked(cfg.database_url)}'")
        console.print(f"Flower log: {log_path}")
        print_tail(log_path)
        return 1
    failures = read.failed_clients(engine, run.id)
    if failures:
        # every round finished, but some sampled node did not train what it was sent: not "done"
        console.print(f"\n[red]completed with {failures} failed client "
                      f"{'reply' if failures == 1 else 'replies'}[/] in {elapsed:.0f} s (listed under their "
                      f"rounds above). run id {run.id} (Flower run {run.flwr_run_id})")
    else:
        console.print(f"\n[green]done[/] in {elapsed:.0f} s. run id {run.id} (Flower run {run.flwr_run_id})")
    console.print(f"  database: {masked(cfg.database_url)}")
    # the run's directory is keyed by its uuid, held in the DB
    console.print(f"  checkpoints: {RunRecorder(engine).checkpoint_directory(run.id, cfg.checkpoint_path)}")
    console.print(f"  Flower log: {log_path}")
    console.print(f"  list runs: fedlora runs --db '{masked(cfg.database_url)}'")
    dp_summary = read.max_epsilon(engine, run.id)
    if dp_summary is not None:  # some client ran DP-SGD
        console.print(f"  DP: max ε across clients {dp_summary.epsilon:.4g} at δ = {dp_summary.delta:g} "
                      f"({dp_summary.clients} clients)")
    return EXIT_CLIENT_FAILURES if failures else 0

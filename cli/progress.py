"""What ``simulate``, ``resume`` and ``run`` print while a run goes and when it ends, from the database.

A row per finished round, a line under it for every client that did not train, and a
closing summary whose exit status says what the record says: 0 only when the run
completed and every sampled client trained or declined. On a terminal a live line
under the rows (rich's ``Progress``) shows rounds done of total, the last round's
clients, elapsed time and ETA; when stdout is not a terminal (CI, a log file) the
output is plain lines, the same rows.
"""

from __future__ import annotations

import time
from pathlib import Path
from collections.abc import Mapping
from subprocess import DEVNULL, STDOUT, Popen

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from cli.console import console, fmt, print_tail
from core.config import RunConfig
from privacy.accounting import affordable_steps, epsilon, sample_rate
from privacy.settings import central_account
from server.db import read
from server.db.models import RoundRecord, Run
from server.db.session import masked, open_database
from server.federated_report import progress_lines
from server.recording import RunRecorder
from server.tracking import TrackingRecorder, tracked

EXIT_CLIENT_FAILURES = 3  # the run completed, but some sampled client failed or was rejected
EXIT_STOPPED = 4  # the run stopped before a round that would pass its central DP budget (dp-central-epsilon)
HEADER = (f"{'round':>7} {'clients':>8} {'train loss':>11} {'eval loss':>10} {'eval ppl':>9} {'rel.err':>8} "
          f"{'MB down':>8} {'MB up':>7} {'sec':>6}")


def follow(engine: Engine, tag: str, process: Popen[bytes], rounds: int, *, interval: float = 1.0,
           display: RoundDisplay | None = None) -> Run | None:
    """Print a row per finished round until the Flower process exits.

    On a terminal a live line under the rows shows rounds done of total, the last
    round's clients, elapsed time and ETA (``LiveDisplay``); elsewhere (CI, a log file)
    plain lines only (``PlainDisplay``).
    """
    if display is None:
        display = LiveDisplay(console, rounds) if console.is_terminal else PlainDisplay(console, rounds)
    run = None
    with display:
        while True:
            done = process.poll() is not None
            with Session(engine) as session:
                run = read.run_by_tag(session, tag)
                if run is not None:
                    display.show(read.rounds(session, run.id), round_rows(session, run.id, final=done))
                session.expunge_all()
            if done:
                return run
            display.tick()
            time.sleep(interval)


class RoundDisplay:
    """Prints the table's header and each new round's row once; subclasses add the waiting."""

    def __init__(self, out: Console, total: int) -> None:
        self.out = out
        self.total = total
        self.printed = 0  # rows printed (round 0's evaluation is one)
        self.done = 0  # rounds recorded
        self.started = False  # the run's row exists
        self.last_change = time.monotonic()

    def __enter__(self) -> RoundDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def show(self, recorded: list[RoundRecord], rows: list[str]) -> None:
        self.started = True
        if len(recorded) != self.done:
            self.done = len(recorded)
            self.last_change = time.monotonic()
        for row in rows[self.printed:]:
            if self.printed == 0:
                self.out.print(HEADER)
            self.out.print(row, markup=False)  # a node's reason may hold [brackets]
            self.printed += 1
            self.last_change = time.monotonic()

    def tick(self) -> None:
        return None


class PlainDisplay(RoundDisplay):
    """Plain lines: a "still running" line when nothing was recorded for 30 s."""

    def tick(self) -> None:
        if self.started and self.done < self.total and time.monotonic() - self.last_change > 30:
            self.out.print(f"  ... round {self.done + 1}/{self.total} running", style="dim")
            self.last_change = time.monotonic()


class LiveDisplay(RoundDisplay):
    """A rich progress line kept under the rows: rounds, last round's clients, elapsed, ETA."""

    def __init__(self, out: Console, total: int) -> None:
        super().__init__(out, total)
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("rounds | {task.fields[clients]} | elapsed"), TimeElapsedColumn(),
            TextColumn("| ETA {task.fields[eta]}"), console=out, transient=True,
        )
        self.task = self.progress.add_task("starting", total=total, clients="clients -", eta="-")

    def __enter__(self) -> LiveDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def show(self, recorded: list[RoundRecord], rows: list[str]) -> None:
        super().show(recorded, rows)  # printed above the live line
        fields: dict[str, str] = {}
        if recorded:
            last = recorded[-1]
            fields["clients"] = f"round {last.number}: {last.num_aggregated}/{last.num_sampled} clients aggregated"
            fields["eta"] = eta(recorded, self.total, since_last=time.monotonic() - self.last_change)
        done = len(recorded)
        description = "finishing" if done >= self.total else f"round {done + 1}/{self.total} running"
        self.progress.update(self.task, completed=min(done, self.total), description=description, **fields)


def eta(recorded: list[RoundRecord], total: int, *, since_last: float) -> str:
    """The rounds left times the mean recorded round, less the time the current one has run."""
    left = total - len(recorded)
    if left <= 0:
        return "0:00:00"
    mean = sum((r.finished_at - r.started_at).total_seconds() for r in recorded) / len(recorded)
    seconds = max(0, int(mean * left - since_last))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def watch(db_url: str, tag: str, command: list[str], *, env: Mapping[str, str], rounds: int, log_path: Path) -> None:
    """``follow`` a deployment run's record while ``command`` (``flwr log --stream``) writes its log to a file."""
    engine = open_database(db_url, write=False)  # the ServerApp may not have created it yet
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        # our process group: Ctrl-C reaches it as it reaches us
        process = Popen(command, env=dict(env), stdout=log, stderr=STDOUT, stdin=DEVNULL)
        try:
            follow(engine, tag, process, rounds)
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=30)
    console.print(f"Flower log: {log_path}", markup=False)


def round_rows(session: Session, run_id: int, *, final: bool = True) -> list[str]:
    """One line per recorded round, then one line per client that did not train ("ok").

    Round 0 (the base model's evaluation) comes first. A round's server-side evaluation
    runs beside the next round's training and lands later, so while the run goes on
    (``final=False``) a round is listed only once its evaluation is in or a later round
    is recorded (it was not due, ``eval-every``).
    """
    evals = {e.round_number: e for e in read.evaluations(session, run_id)}
    not_ok: dict[int, list] = {}
    for c in read.client_updates(session, run_id):
        if c.status != "ok":
            not_ok.setdefault(c.round_id, []).append(c)
    recorded = read.rounds(session, run_id)
    latest = max((r.number for r in recorded), default=0)
    federated = progress_lines(session, run_id)  # recorded before its round's row: complete when that is
    rows = []
    if 0 in evals:
        ev = evals[0]
        rows.append(f"{0:>7} {'-':>8} {'-':>11} {fmt(ev.loss):>10} {fmt(ev.perplexity, 2):>9} {'-':>8} "
                    f"{'-':>8} {'-':>7} {'-':>6}")
    for r in recorded:
        ev = evals.get(r.number)
        if not (final or ev is not None or r.number < latest):
            break  # its evaluation may still be running: list it next time
        row = (
            f"{r.number:>7} {f'{r.num_aggregated}/{r.num_sampled}':>8} {fmt(r.train_loss):>11} "
            f"{fmt(ev.loss if ev else None):>10} {fmt(ev.perplexity if ev else None, 2):>9} "
            f"{fmt(r.relative_error, 3):>8} {r.bytes_down / 1e6:>8.2f} {r.bytes_up / 1e6:>7.2f} "
            f"{(r.finished_at - r.started_at).total_seconds():>6.1f}"
        )
        for c in not_ok.get(r.id, []):
            reason = " ".join((c.reason or "no reason given").split())  # one line, whatever the node sent
            row += f"\n{'':>9}node {c.node_id} (rank {c.rank if c.rank is not None else '?'}): {c.status}: {reason}"
        for line in federated.get(r.number, []):
            row += f"\n{'':>9}{line}"
        rows.append(row)
    return rows


def central_plan(cfg: RunConfig, nodes: int) -> str | None:
    """What central DP will spend on this run, said before it starts; None without its noise or on a resume."""
    account = central_account(cfg.to_flower())
    if account is None or cfg.resume_run_id:
        return None  # a resume's spending so far is in its checkpoint; the ServerApp continues it
    rate, rounds = sample_rate(cfg.clients_per_round, nodes), cfg.num_server_rounds
    how = f"δ = {account.delta:g}, q = {rate:.3g}, z = {account.noise_multiplier:g}, {account.accountant}"
    spent = epsilon(((account.noise_multiplier, rate, rounds),), delta=account.delta, accountant=account.accountant)
    if not account.budget or spent <= account.budget:
        return f"central DP: user-level ε {spent:.4g} after {rounds} rounds ({how})"
    fit = affordable_steps(history=(), noise_multiplier=account.noise_multiplier, sample_rate=rate, max_steps=rounds,
                           target_epsilon=account.budget, delta=account.delta, accountant=account.accountant)
    return (f"central DP: dp-central-epsilon {account.budget:g} affords {fit} of {rounds} rounds ({how}); "
            f"the run stops before round {fit + 1}")


def mark_interrupted(engine: Engine, tag: str, reason: str, *, mlflow_uri: str = "") -> Run | None:
    """Record that the run with ``tag`` stopped mid-way (resumable); a finished run is left as it is.

    With ``mlflow_uri`` the run's MLflow copy is marked too (a resume reopens it).
    """
    with Session(engine) as session:
        run = read.run_by_tag(session, tag)
        if run is not None and run.status == "running":
            _recorder(engine, mlflow_uri).finish_run(run.id, status="interrupted", error=reason)
            session.refresh(run)
        if run is not None:
            session.expunge(run)
    return run


def summarize(engine: Engine, cfg: RunConfig, run: Run | None, *, elapsed: float, log_path: Path) -> int:
    """The closing lines and exit status of a simulation, from what the database holds.

    0 only when the run completed and every sampled client trained or declined;
    EXIT_CLIENT_FAILURES when it completed over failed or rejected clients; EXIT_STOPPED when
    it stopped at its central DP budget; 1 otherwise.
    """
    if run is not None and run.status == "running":
        run = mark_interrupted(engine, cfg.run_tag, "the coordinator process ended before the run finished",
                               mlflow_uri=cfg.mlflow_uri)
    if run is not None and run.status == "stopped":
        return _stopped(engine, cfg, run, log_path=log_path)
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
    _print_central_epsilon(engine, cfg, run.id)
    return EXIT_CLIENT_FAILURES if failures else 0


def _stopped(engine: Engine, cfg: RunConfig, run: Run, *, log_path: Path) -> int:
    """A run its central DP budget ended before the round that would pass it: its last round is its result."""
    db = masked(cfg.database_url)
    console.print("[yellow]run stopped[/]: ", end="")
    console.print(run.error or "see the log", markup=False)
    with Session(engine) as session:
        done = len(read.rounds(session, run.id))
    if done:
        console.print(f"  its model after round {done}: fedlora export {run.id} --out DIR --db '{db}'", markup=False)
    _print_central_epsilon(engine, cfg, run.id)
    console.print(f"  database: {db}", markup=False)
    console.print(f"  Flower log: {log_path}", markup=False)
    return EXIT_STOPPED


def _print_central_epsilon(engine: Engine, cfg: RunConfig, run_id: int) -> None:
    with Session(engine) as session:
        points = read.central_epsilon_points(read.rounds(session, run_id))
    if points:
        console.print(f"  central DP: user-level ε {points[-1][1]:.4g} at δ = {cfg.dp_delta:g} "
                      f"after {len(points)} rounds")


def _recorder(engine: Engine, mlflow_uri: str) -> RunRecorder | TrackingRecorder:
    try:
        return tracked(RunRecorder(engine), mlflow_uri)
    except ValueError as exc:  # the database is the record; say that MLflow missed this
        console.print(f"  (not marked in MLflow: {exc})", style="yellow", markup=False)
        return RunRecorder(engine)

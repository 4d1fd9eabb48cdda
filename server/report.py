"""Run reports from the database: a terminal table, PNG plots and one HTML page.

``fedlora report RUN_ID [RUN_ID ...] --out DIR`` (``cli.report``) reads only the database, so it works
on finished runs and on runs still going (it shows the rounds written so far).
Several runs are drawn side by side on the same axes.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session

from server.db import read
from server.db.models import Run
from server.db.session import open_database


@dataclass
class RunSeries:
    """Everything a report shows about one run, per round."""

    run_id: int
    aggregator: str
    model: str
    status: str
    rounds: list[int] = field(default_factory=list)
    train_loss: list[float | None] = field(default_factory=list)
    relative_error: list[float | None] = field(default_factory=list)
    mb_down: list[float] = field(default_factory=list)
    mb_up: list[float] = field(default_factory=list)
    clients_ok: list[int] = field(default_factory=list)
    clients_sampled: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    eval_rounds: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    eval_ppl: list[float] = field(default_factory=list)
    epsilon: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # node -> (round, eps)

    @property
    def label(self) -> str:
        return f"run {self.run_id} ({self.aggregator})"

    @property
    def best_round(self) -> int | None:
        if not self.eval_ppl:
            return None
        return self.eval_rounds[min(range(len(self.eval_ppl)), key=self.eval_ppl.__getitem__)]

    @property
    def max_epsilon(self) -> float | None:
        values = [eps for points in self.epsilon.values() for _, eps in points]
        return max(values) if values else None


def load_series(session: Session, run_id: int) -> RunSeries:
    run = session.get(Run, run_id)
    if run is None:
        raise ValueError(f"run {run_id} is not in the database")
    series = RunSeries(run_id=run.id, aggregator=run.aggregator, model=run.model, status=run.status)
    for r in read.rounds(session, run_id):
        series.rounds.append(r.number)
        series.train_loss.append(r.train_loss)
        series.relative_error.append(r.relative_error)
        series.mb_down.append(r.bytes_down / 1e6)
        series.mb_up.append(r.bytes_up / 1e6)
        series.clients_ok.append(r.num_aggregated)
        series.clients_sampled.append(r.num_sampled)
        series.seconds.append((r.finished_at - r.started_at).total_seconds())
    for e in read.evaluations(session, run_id):
        series.eval_rounds.append(e.round_number)
        series.eval_loss.append(e.loss)
        series.eval_ppl.append(e.perplexity)
    for node, points in read.epsilon_points(read.client_updates(session, run_id)).items():
        series.epsilon[node] = [(number, eps) for number, eps, _ in points]
    return series


# --- plots -----------------------------------------------------------------------------------


def _plot(path: Path, title: str, ylabel: str, lines: list[tuple[str, list, list]], *, kind: str = "line") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for label, xs, ys in lines:
        points = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if points:
            px, py = zip(*points)
            if kind == "step":
                ax.step(px, py, where="mid", label=label)
            else:
                ax.plot(px, py, marker="o", markersize=3, label=label)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def make_plots(series: list[RunSeries], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    plots = [
        _plot(out / "train_loss.png", "train loss (weighted mean of clients)", "loss",
              [(s.label, s.rounds, s.train_loss) for s in series]),
        _plot(out / "eval_perplexity.png", "held-out answer perplexity (round 0 = before training)", "perplexity",
              [(s.label, s.eval_rounds, s.eval_ppl) for s in series]),
        _plot(out / "bytes.png", "MB per round (down + up)", "MB",
              [(s.label, s.rounds, [d + u for d, u in zip(s.mb_down, s.mb_up)]) for s in series]),
        _plot(out / "clients.png", "clients aggregated per round", "clients",
              [(s.label, s.rounds, s.clients_ok) for s in series], kind="step"),
    ]
    if any(s.epsilon for s in series):
        lines = [(f"{s.label} node {node[-6:]}", [r for r, _ in pts], [e for _, e in pts])
                 for s in series for node, pts in sorted(s.epsilon.items())]
        plots.append(_plot(out / "epsilon.png", "DP epsilon spent per client", "epsilon", lines))
    return plots


# --- tables ----------------------------------------------------------------------------------

SUMMARY_COLUMNS = ("run", "aggregator", "status", "rounds", "final eval ppl", "best round", "MB down", "MB up",
                   "wall s", "max eps")


def summary_row(s: RunSeries) -> list[str]:
    return [
        str(s.run_id), s.aggregator, s.status, str(len(s.rounds)),
        f"{s.eval_ppl[-1]:.3f}" if s.eval_ppl else "-",
        str(s.best_round) if s.best_round is not None else "-",
        f"{sum(s.mb_down):.2f}", f"{sum(s.mb_up):.2f}", f"{sum(s.seconds):.1f}",
        f"{s.max_epsilon:.3f}" if s.max_epsilon is not None else "-",
    ]


def write_html(series: list[RunSeries], plots: list[Path], out: Path) -> Path:
    def table(headers, rows) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    images = "".join(
        f'<img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">' for p in plots
    )
    sections = []
    for s in series:
        evals = dict(zip(s.eval_rounds, s.eval_ppl))
        rows = [
            [r, f"{ok}/{n}", "-" if tl is None else f"{tl:.4f}", f"{evals[r]:.3f}" if r in evals else "-",
             "-" if re is None else f"{re:.4f}", f"{d:.3f}", f"{u:.3f}", f"{sec:.1f}"]
            for r, ok, n, tl, re, d, u, sec in zip(s.rounds, s.clients_ok, s.clients_sampled, s.train_loss,
                                                   s.relative_error, s.mb_down, s.mb_up, s.seconds)
        ]
        sections.append(f"<h2>{html.escape(s.label)}: {html.escape(s.model)}, {html.escape(s.status)}</h2>"
                        + table(("round", "clients", "train loss", "eval ppl", "rel. error", "MB down", "MB up", "s"),
                                rows))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>fedlora report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}img{{max-width:48%;margin:4px}}</style></head>
<body><h1>fedlora report</h1>{table(SUMMARY_COLUMNS, [summary_row(s) for s in series])}{images}{''.join(sections)}
</body></html>"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def build_report(db_url: str, run_ids: list[int], out: Path) -> tuple[list[RunSeries], Path]:
    with Session(open_database(db_url, create=False, write=False)) as session:  # a typo is not a new DB
        series = [load_series(session, run_id) for run_id in run_ids]
    plots = make_plots(series, out)
    return series, write_html(series, plots, out)

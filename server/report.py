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
from server.federated_report import FederatedRound, NodeEvalRow, federated_html, load_federated, plot_nodes


@dataclass(frozen=True, kw_only=True)
class ClientRow:
    """One sampled client in one round, as the round log holds it."""

    round: int
    node: str
    rank: int | None
    examples: int | None
    loss: float | None
    seconds: float | None
    bytes_down: int
    bytes_up: int
    status: str  # ok | rejected | failed | declined | resync
    reason: str
    epsilon: float | None  # local DP-SGD ε spent so far on the node's data, where it ran DP


@dataclass(frozen=True, kw_only=True)
class InitSummary:
    """What a run's init (Fed-SB's LoRA-SB init, ``sb-init``) was, read from its ``initialisations`` row."""

    kind: str  # server-public | federated | random
    seconds: float
    bytes_down: int
    bytes_up: int
    calibration_examples: int | None  # server-public: the calibration ids (disjoint from the evaluation ones)
    nodes: int | None  # federated: the nodes whose sketch was used

    def describe(self) -> str:
        if self.kind == "random":
            return "init random (ablation: random orthonormal B and A, no LoRA-SB step)"
        where = (f"{self.calibration_examples} calibration examples, none of them evaluated on"
                 if self.calibration_examples is not None else f"sketches from {self.nodes} nodes")
        return (f"init {self.kind} (LoRA-SB): {where}; {self.seconds:.1f} s, {self.bytes_down / 1e6:.2f} MB down, "
                f"{self.bytes_up / 1e6:.2f} MB up")


def load_init(session: Session, run_id: int) -> InitSummary | None:
    row = read.initialisation(session, run_id)
    if row is None:
        return None
    details = row.details if isinstance(row.details, dict) else {}
    calibration = details.get("calibration-ids")
    nodes = [n for n in details.get("nodes", []) if isinstance(n, dict) and n.get("status") == "ok"]
    return InitSummary(kind=row.kind, seconds=row.seconds, bytes_down=row.bytes_down, bytes_up=row.bytes_up,
                       calibration_examples=len(calibration) if calibration is not None else None,
                       nodes=len(nodes) if "nodes" in details else None)


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
    clients: list[ClientRow] = field(default_factory=list)  # round order, then as recorded
    federated: list[FederatedRound] = field(default_factory=list)  # federated evaluation: aggregate and spread
    node_evals: list[NodeEvalRow] = field(default_factory=list)  # ... and each node's row (node-eval-report)
    config: dict[str, object] = field(default_factory=dict)  # the run config the run started with
    init: InitSummary | None = None  # the adapter's init before round 1 (Fed-SB), where it had one

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
    series = RunSeries(run_id=run.id, aggregator=run.aggregator, model=run.model, status=run.status,
                       config=dict(run.config or {}))
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
    updates = read.client_updates(session, run_id)
    for node, points in read.epsilon_points(updates).items():
        series.epsilon[node] = [(number, eps) for number, eps, _ in points]
    for u in updates:
        metrics = u.metrics if isinstance(u.metrics, dict) else {}
        series.clients.append(ClientRow(
            round=u.round_number, node=u.node_id, rank=u.rank, examples=u.num_examples, loss=u.train_loss,
            seconds=u.seconds, bytes_down=u.bytes_down, bytes_up=u.bytes_up, status=u.status, reason=u.reason or "",
            epsilon=float(metrics["dp-epsilon"]) if "dp-epsilon" in metrics else None))
    series.federated, series.node_evals = load_federated(session, run_id)
    series.init = load_init(session, run_id)
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
    if ax.get_legend_handles_labels()[0]:  # a run with no points yet (no evaluation) draws no line
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
    for s in series:  # one per run: a node's line on another run's axes would say nothing
        if s.federated:
            plots.append(plot_nodes(out / f"federated_nodes_run{s.run_id}.png",
                                    f"{s.label}: held-out loss per node", s.federated, s.node_evals))
    return plots


# --- tables ----------------------------------------------------------------------------------

#: short enough that the terminal's summary table keeps every header whole at 80 columns
SUMMARY_COLUMNS = ("run", "aggregator", "status", "rounds", "eval ppl", "best", "MB dn", "MB up", "wall s", "max ε")
SUMMARY_LEGEND = ("eval ppl: held-out answer perplexity after the last round; best: the round where it was lowest; "
                  "MB dn / MB up: sent to / received from clients; max ε: the largest DP-SGD ε any client spent")


def _compact(value: float, digits: int) -> str:
    """``digits`` decimals below 1000, none above: four significant figures keep the columns narrow."""
    return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.0f}"


def summary_row(s: RunSeries) -> list[str]:
    return [
        str(s.run_id), s.aggregator, s.status, str(len(s.rounds)),
        _compact(s.eval_ppl[-1], 3) if s.eval_ppl else "-",
        str(s.best_round) if s.best_round is not None else "-",
        _compact(sum(s.mb_down), 2), _compact(sum(s.mb_up), 2), _compact(sum(s.seconds), 1),
        f"{s.max_epsilon:.3f}" if s.max_epsilon is not None else "-",
    ]


def _table(headers, rows, *, css_class: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    opening = f'<table class="{css_class}">' if css_class else "<table>"
    return f"{opening}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


CLIENT_COLUMNS = ("round", "node", "status", "rank", "examples", "train loss", "s", "down", "up", "reason")


def client_table(s: RunSeries) -> str:
    """Every sampled client of every round; the round cell spans its clients' rows."""
    with_eps = any(c.epsilon is not None for c in s.clients)
    headers = CLIENT_COLUMNS[:-1] + (("ε",) if with_eps else ()) + CLIENT_COLUMNS[-1:]
    by_round: dict[int, list[ClientRow]] = {}
    for c in s.clients:
        by_round.setdefault(c.round, []).append(c)
    rows = []
    for number, clients in by_round.items():
        for i, c in enumerate(clients):
            cells = [f"<code>{html.escape(c.node)}</code>", html.escape(c.status)] + [html.escape(v) for v in (
                "-" if c.rank is None else str(c.rank), "-" if c.examples is None else str(c.examples),
                "-" if c.loss is None else f"{c.loss:.4f}", "-" if c.seconds is None else f"{c.seconds:.1f}",
                _size(c.bytes_down), _size(c.bytes_up))]
            if with_eps:
                cells.append("-" if c.epsilon is None else f"{c.epsilon:.3f}")
            cells.append(html.escape(c.reason))
            first = f'<td rowspan="{len(clients)}">{number}</td>' if i == 0 else ""
            tds = "".join(f'<td class="reason">{cell}</td>' if j == len(cells) - 1 else f"<td>{cell}</td>"
                          for j, cell in enumerate(cells))
            rows.append(f'<tr class="{html.escape(c.status)}">{first}{tds}</tr>')
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    return (f'<h3>clients, per round</h3><table class="clients"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>" if rows else "<h3>clients, per round</h3><p>none recorded</p>")


def config_table(s: RunSeries) -> str:
    rows = [[key, value] for key, value in sorted(s.config.items())]
    return (f"<details open><summary>run config ({len(rows)} keys)</summary>"
            + _table(("key", "value"), rows, css_class="config") + "</details>")


def write_html(series: list[RunSeries], plots: list[Path], out: Path) -> Path:
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
        init = f"<p>{html.escape(s.init.describe())}</p>" if s.init else ""
        sections.append(f"<h2>{html.escape(s.label)}: {html.escape(s.model)}, {html.escape(s.status)}</h2>" + init
                        + _table(("round", "clients", "train loss", "eval ppl", "rel. error", "MB down", "MB up", "s"),
                                 rows)
                        + client_table(s) + federated_html(s.federated, s.node_evals) + config_table(s))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>fedlora report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}img{{max-width:48%;margin:4px}}
td.reason{{text-align:left;max-width:32em}}table.config td{{text-align:left;font-family:monospace}}
tr.failed td,tr.rejected td{{background:#fde8e8}}tr.declined td,tr.resync td{{background:#f3f3f3}}
td[rowspan]{{background:#fff!important;vertical-align:top}}
td.worst{{background:#fde8e8}}td.best{{background:#e6f4e6}}td.failed{{background:#f3f3f3}}
table.clients th:last-child{{text-align:left}}p.legend{{color:#555;font-size:90%}}
summary{{font-weight:bold;margin-top:1em;cursor:pointer}}</style></head>
<body><h1>fedlora report</h1>{_table(SUMMARY_COLUMNS, [summary_row(s) for s in series])}
<p class="legend">{html.escape(SUMMARY_LEGEND)}</p>{images}{''.join(sections)}
</body></html>"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def build_report(db_url: str, run_ids: list[int], out: Path) -> tuple[list[RunSeries], Path]:
    with Session(open_database(db_url, create=False, write=False)) as session:  # a typo is not a new DB
        series = [load_series(session, run_id) for run_id in run_ids]
    plots = make_plots(series, out)
    return series, write_html(series, plots, out)

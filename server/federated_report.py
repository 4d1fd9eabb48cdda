"""Federated evaluation in reports: per round the aggregate and the spread across nodes, per node its curve.

The round's aggregate (the example-weighted mean of the nodes' held-out losses) can look
fine while one node does badly: a global adapter that serves the big nodes and fails a
small one. So every view shows the spread beside it: the worst node's loss, the median and
the best, and which node was worst. The HTML report adds one line per node (plus the
aggregate) and a node x round table; a run recorded with ``node-eval-report=aggregate``
has no per-node rows, and shows the aggregate and the spread only.

Used by ``server.report`` (``fedlora report``) and ``cli.runs`` (``fedlora runs``).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from server.db import read


@dataclass(frozen=True, kw_only=True)
class NodeEvalRow:
    """One node's evaluation of one round's global adapter."""

    round: int
    node: str  # the node's stable key (its Flower id when it had none)
    status: str  # ok | failed | resync
    reason: str
    loss: float | None
    examples: int | None


@dataclass(frozen=True, kw_only=True)
class FederatedRound:
    """A round's federated evaluation: aggregate and spread (all None when no node evaluated)."""

    round: int
    nodes: int  # evaluated ("ok")
    asked: int  # evaluated + failed
    examples: int
    loss: float | None
    perplexity: float | None
    worst: float | None
    median: float | None
    best: float | None
    worst_node: str | None  # None when only aggregates were recorded (node-eval-report=aggregate)
    worst_examples: int | None = None  # the worst node's held-out examples: is it a small one?

    @property
    def worst_label(self) -> str:
        if self.worst_node is None:
            return "-"
        return self.worst_node + ("" if self.worst_examples is None else f" ({self.worst_examples})")


def load_federated(session: Session, run_id: int) -> tuple[list[FederatedRound], list[NodeEvalRow]]:
    """Every evaluated round (also one where no node answered) and every node's row, by round."""
    nodes = [NodeEvalRow(round=n.round_number, node=n.node_key or n.node_id, status=n.status, reason=n.reason or "",
                         loss=n.loss, examples=n.num_examples) for n in read.node_evaluations(session, run_id)]
    by_round: dict[int, list[NodeEvalRow]] = {}
    for n in nodes:
        by_round.setdefault(n.round, []).append(n)
    rounds = {}
    for f in read.federated_evaluations(session, run_id):
        rows = by_round.get(f.round_number, [])
        rounds[f.round_number] = FederatedRound(
            round=f.round_number, nodes=f.nodes, asked=f.nodes + f.failed, examples=f.num_examples, loss=f.loss,
            perplexity=f.perplexity, worst=f.worst_loss, median=f.median_loss, best=f.best_loss,
            **_worst_node(rows, f.worst_loss))
    for number, rows in by_round.items():  # recorded per node, but none evaluated: no aggregate row
        if number not in rounds:
            rounds[number] = FederatedRound(round=number, nodes=0, asked=len(rows), examples=0, loss=None,
                                            perplexity=None, worst=None, median=None, best=None, worst_node=None)
    return [rounds[k] for k in sorted(rounds)], nodes


def _worst_node(rows: list[NodeEvalRow], worst: float) -> dict[str, str | int | None]:
    at_worst = [n for n in rows if n.status == "ok" and n.loss == worst]
    if not at_worst:  # aggregate-only: no node's row to name
        return {"worst_node": None, "worst_examples": None}
    return {"worst_node": at_worst[0].node, "worst_examples": at_worst[0].examples}


# --- terminal ---------------------------------------------------------------------------------

#: short enough for 80 columns with a run id in front (``fedlora runs``)
FEDERATED_COLUMNS = ("round", "nodes", "loss", "ppl", "worst", "median", "best", "worst node")
FEDERATED_LEGEND = ("federated evaluation, on each node's own held-out slice: loss: the example-weighted mean of "
                    "the nodes' losses (ppl: its exp); worst / median / best: the nodes' own losses; "
                    "nodes: evaluated/asked; worst node: its key (its held-out examples)")


def _num(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.0f}"  # narrow columns: 4+ figures


def federated_row(f: FederatedRound) -> list[str]:
    return [str(f.round), f"{f.nodes}/{f.asked}", _num(f.loss, 4), _num(f.perplexity, 2), _num(f.worst, 4),
            _num(f.median, 4), _num(f.best, 4), f.worst_label]


def progress_lines(session: Session, run_id: int) -> dict[int, list[str]]:
    """round -> what ``simulate`` / ``run`` print under its row: one line with the aggregate and
    the spread, then one per node whose evaluation failed, with the reason."""
    rounds, nodes = load_federated(session, run_id)
    lines = {f.round: [progress_line(f)] for f in rounds}
    for n in nodes:
        if n.status != "ok":
            reason = " ".join((n.reason or "no reason given").split())  # one line, whatever the node sent
            lines[n.round].append(f"node {n.node} (evaluation): {n.status}: {reason}")
    return lines


def progress_line(f: FederatedRound) -> str:
    if f.loss is None:
        return f"federated loss - over 0/{f.asked} nodes: no node evaluated"
    # within 80 columns under the row's indent up to the worst node's key (free text, any length)
    worst = f" (worst: {f.worst_node}, {f.worst_examples} ex)" if f.worst_node else ""
    return (f"federated loss {_num(f.loss, 4)} over {f.nodes}/{f.asked} nodes: worst {_num(f.worst, 4)} "
            f"median {_num(f.median, 4)} best {_num(f.best, 4)}{worst}")


# --- HTML -------------------------------------------------------------------------------------

MAX_LABELLED_NODES = 12  # more nodes than this: their lines stay, their legend entries go


def plot_nodes(path: Path, title: str, rounds: list[FederatedRound], nodes: list[NodeEvalRow]) -> Path:
    """One line per node (its held-out loss per round), the aggregate on top, the worst..best band under."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)  # the legend goes under the axes: the band fills them
    done = [f for f in rounds if f.loss is not None]
    xs = [f.round for f in done]
    if done:
        ax.fill_between(xs, [f.best for f in done], [f.worst for f in done], color="0.9", label="best..worst node")
    curves: dict[str, list[tuple[int, float]]] = {}
    held: dict[str, int] = {}
    for n in nodes:
        if n.status == "ok" and n.loss is not None:
            curves.setdefault(n.node, []).append((n.round, n.loss))
            held[n.node] = n.examples or 0
    labelled = len(curves) <= MAX_LABELLED_NODES
    for node, points in sorted(curves.items()):
        px, py = zip(*points)
        ax.plot(px, py, marker="o", markersize=3, linewidth=1, alpha=0.8,
                label=f"{node} ({held[node]} ex)" if labelled else None)
    if done:
        ax.plot(xs, [f.loss for f in done], color="black", linewidth=2.5, linestyle="--", marker="s", markersize=4,
                label="aggregate (example-weighted)")
        if not curves:  # aggregate-only run: the median is all there is of the middle
            ax.plot(xs, [f.median for f in done], color="0.4", linestyle=":", label="median node")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_title(title if labelled else f"{title} ({len(curves)} nodes)")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _cells(row: list[str]) -> str:
    return "".join(f"<td>{html.escape(c)}</td>" for c in row)


def federated_html(rounds: list[FederatedRound], nodes: list[NodeEvalRow]) -> str:
    """The run's per-round aggregate and spread, the node x round losses and every failed evaluation."""
    if not rounds:
        return ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in (*FEDERATED_COLUMNS[:2], "examples", *FEDERATED_COLUMNS[2:]))
    body = "".join(f"<tr>{_cells(r[:2] + [str(f.examples)] + r[2:])}</tr>"
                   for f, r in ((f, federated_row(f)) for f in rounds))
    out = (f"<h3>federated evaluation, per round</h3><table class=\"federated\"><thead><tr>{head}</tr></thead>"
           f"<tbody>{body}</tbody></table><p class=\"legend\">{html.escape(FEDERATED_LEGEND)}</p>")
    if not nodes:
        return out + "<p>per-node rows not recorded (node-eval-report=aggregate)</p>"
    return out + _node_matrix(rounds, nodes) + _failures(nodes)


def _node_matrix(rounds: list[FederatedRound], nodes: list[NodeEvalRow]) -> str:
    """node x round: each cell the node's loss; the round's worst node red, its best green."""
    numbers = [f.round for f in rounds]
    spread = {f.round: f for f in rounds}
    cells: dict[str, dict[int, NodeEvalRow]] = {}
    for n in nodes:
        cells.setdefault(n.node, {})[n.round] = n
    rows = []
    for node, by_round in sorted(cells.items()):
        held = max((n.examples or 0 for n in by_round.values()), default=0)
        tds = [f"<td><code>{html.escape(node)}</code></td><td>{held or '-'}</td>"]
        for number in numbers:
            n = by_round.get(number)
            if n is None:
                tds.append("<td></td>")  # not asked this round
            elif n.status != "ok" or n.loss is None:
                tds.append(f'<td class="failed" title="{html.escape(n.reason)}">{html.escape(n.status)}</td>')
            else:
                f = spread[number]
                mark = ' class="worst"' if n.loss == f.worst and f.nodes > 1 else (
                    ' class="best"' if n.loss == f.best and f.nodes > 1 else "")
                tds.append(f"<td{mark}>{n.loss:.4f}</td>")
        rows.append(f"<tr>{''.join(tds)}</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("node", "held out", *(f"round {r}" for r in numbers)))
    return (f'<h3>held-out loss per node</h3><table class="nodes"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def _failures(nodes: list[NodeEvalRow]) -> str:
    failed = [n for n in nodes if n.status != "ok"]
    if not failed:
        return ""
    rows = "".join(f'<tr class="{html.escape(n.status)}">{_cells([str(n.round), n.node, n.status])}'
                   f'<td class="reason">{html.escape(n.reason)}</td></tr>' for n in failed)
    return ("<h3>evaluations that failed</h3><table class=\"eval-failures\"><thead><tr><th>round</th><th>node</th>"
            f"<th>status</th><th>reason</th></tr></thead><tbody>{rows}</tbody></table>")

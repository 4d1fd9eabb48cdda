"""Federated evaluation in reports: the aggregate beside the spread, the worst node named, per-node curves."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy.orm import Session

from cli.app import main
from server.db.session import open_database
from server.federated_eval import NodeEvaluationResult, RoundEvaluation
from server.federated_report import federated_html, federated_row, load_federated, progress_line
from server.recording import RunRecorder
from server.rounds import ClientOutcome, RoundReport

#: round -> (node key, loss, held-out examples); None: the node's evaluation failed
ROUNDS = {
    1: [("hospital-a", 2.0, 400), ("hospital-b", 2.2, 300), ("clinic-c", 5.0, 8)],
    2: [("hospital-a", 1.5, 400), ("hospital-b", 1.7, 300), ("clinic-c", None, 8)],
}


def federated_run(db: str, *, per_node: bool = True, rounds: dict = ROUNDS) -> int:
    """A run with a training round and a federated evaluation per round (the small clinic does badly)."""
    rec = RunRecorder(open_database(db))
    run_id = rec.start_run(config={}, aggregator="flora", model="tiny", tag="", flwr_run_id=None)
    t0 = datetime(2026, 1, 1)
    for number, rows in rounds.items():
        nodes = tuple(
            NodeEvaluationResult(100 + i, key, "ok", loss=loss, perplexity=2.718 ** loss, num_examples=n,
                                 tokens=10 * n, seconds=0.5) if loss is not None
            else NodeEvaluationResult(100 + i, key, "failed", "evaluation failed: CUDA out of memory <oom>")
            for i, (key, loss, n) in enumerate(rows))
        rec.record_federated_evaluation(run_id, RoundEvaluation(number=number, nodes=nodes), per_node=per_node)
        outcomes = (ClientOutcome(7, "ok", rank=4, num_examples=30, train_loss=2.0, seconds=1.0),)
        rec.record_round(run_id, RoundReport(number=number, started_at=t0, finished_at=t0 + timedelta(seconds=3),
                                             outcomes=outcomes, aggregated=True, train_loss=2.0, relative_error=0.1,
                                             aggregate_seconds=0.0), None)
    rec.finish_run(run_id, status="completed")
    return run_id


def _load(db: str, run_id: int):
    with Session(open_database(db)) as session:
        return load_federated(session, run_id)


def test_each_round_has_the_weighted_aggregate_the_spread_and_the_worst_node(tmp_path):
    db = f"sqlite:///{tmp_path}/r.db"
    rounds, nodes = _load(db, federated_run(db))
    first, second = rounds
    assert first.loss == pytest.approx((2.0 * 400 + 2.2 * 300 + 5.0 * 8) / 708)
    assert (first.worst, first.median, first.best) == (5.0, 2.2, 2.0)
    assert (first.worst_node, first.worst_examples, first.nodes, first.asked) == ("clinic-c", 8, 3, 3)
    assert federated_row(first) == ["1", "3/3", "2.1186", "8.32", "5.0000", "2.2000", "2.0000", "clinic-c (8)"]
    # the clinic failed in round 2: counted as asked, not in the aggregate
    assert (second.nodes, second.asked, second.worst_node, second.worst) == (2, 3, "hospital-b", 1.7)
    assert len(nodes) == 6 and [n.status for n in nodes if n.node == "clinic-c"] == ["ok", "failed"]
    assert progress_line(first) == ("federated loss 2.1186 over 3/3 nodes: worst 5.0000 median 2.2000 best 2.0000 "
                                    "(worst: clinic-c, 8 ex)")


def test_an_aggregate_only_run_shows_the_spread_without_naming_nodes(tmp_path):
    db = f"sqlite:///{tmp_path}/r.db"
    rounds, nodes = _load(db, federated_run(db, per_node=False))
    assert nodes == [] and [f.worst_node for f in rounds] == [None, None]
    assert federated_row(rounds[0])[-4:] == ["5.0000", "2.2000", "2.0000", "-"]
    assert progress_line(rounds[0]).endswith("best 2.0000")
    assert "node-eval-report=aggregate" in federated_html(rounds, nodes)


def test_a_round_where_no_node_evaluated_is_listed_with_its_failures(tmp_path):
    db = f"sqlite:///{tmp_path}/r.db"
    rounds, nodes = _load(db, federated_run(db, rounds={1: [("a", None, 5), ("b", None, 5)]}))
    (only,) = rounds
    assert (only.nodes, only.asked, only.loss) == (0, 2, None)
    assert federated_row(only) == ["1", "0/2", "-", "-", "-", "-", "-", "-"]
    assert progress_line(only) == "federated loss - over 0/2 nodes: no node evaluated"


def test_the_html_marks_the_worst_and_best_node_per_round_and_lists_failures_escaped(tmp_path):
    db = f"sqlite:///{tmp_path}/r.db"
    run_id = federated_run(db)
    out = tmp_path / "out"
    assert main(["report", str(run_id), "--out", str(out), "--db", db]) == 0
    page = (out / "report.html").read_text()
    assert (out / f"federated_nodes_run{run_id}.png").read_bytes()[:4] == b"\x89PNG"
    assert page.count("data:image/png;base64,") == 5  # the four per-run plots and the per-node one
    federated = page.split('<table class="federated">')[1].split("</table>")[0]
    assert "<tr><td>1</td><td>3/3</td><td>708</td><td>2.1186</td>" in federated
    matrix = page.split('<table class="nodes">')[1].split("</table>")[0]
    assert ('<tr><td><code>clinic-c</code></td><td>8</td><td class="worst">5.0000</td>'
            '<td class="failed" title="evaluation failed: CUDA out of memory &lt;oom&gt;">failed</td></tr>') in matrix
    assert '<td><code>hospital-a</code></td><td>400</td><td class="best">2.0000</td><td class="best">1.5000</td>' \
        in matrix
    failures = page.split('<table class="eval-failures">')[1].split("</table>")[0]
    assert "CUDA out of memory &lt;oom&gt;" in failures and failures.count("<tr class=") == 1


def test_a_run_without_federated_evaluation_has_no_federated_section(tmp_path):
    assert federated_html([], []) == ""


def test_a_round_evaluated_again_replaces_its_rows(tmp_path):
    # a resumed run that redoes a round records its federated evaluation again: one set of rows
    db = f"sqlite:///{tmp_path}/r.db"
    run_id = federated_run(db)
    again = tuple(NodeEvaluationResult(200 + i, key, "ok", loss=1.0, perplexity=2.718, num_examples=10,
                                       tokens=100, seconds=0.1) for i, key in enumerate(("hospital-a", "hospital-b")))
    RunRecorder(open_database(db)).record_federated_evaluation(run_id, RoundEvaluation(number=2, nodes=again),
                                                                per_node=True)
    rounds, nodes = _load(db, run_id)
    assert [r.round for r in rounds] == [1, 2] and rounds[1].nodes == 2 and rounds[1].loss == pytest.approx(1.0)
    assert sorted(n.node for n in nodes if n.round == 2) == ["hospital-a", "hospital-b"]
    assert len([n for n in nodes if n.round == 1]) == 3  # the other round is untouched

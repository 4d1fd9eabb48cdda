"""The quick quality benchmark's plumbing: two methods (one of each adapter kind: LoRA's A and
B, Fed-SB's R) and Fed-SB with its random init as an extra row, the references, the tables
and the plot; on the in-process engine (the benchmark's default), and one method on Flower's.

Every aggregator runs end to end through the real ServerApp and ClientApp in
tests/server/test_every_aggregator.py.
"""

import csv
import json
import math

import pytest
import torch
from sqlalchemy import func, select
from sqlalchemy.orm import Session

import aggregation
from server.db.models import ClientUpdateRecord, RoundRecord, Run
from server.db.session import open_database
from simulations.bench_quality import QUICK, eval_rounds, main, references

pytestmark = pytest.mark.integration


METHODS = ("fedavg", "fed-sb")


def test_quick_quality_benchmark_has_a_finite_row_per_method(tmp_path):
    assert {aggregation.get_class(n).adapter_kind for n in METHODS} == {"lora", "bra"}
    assert main(["--quick", "--out", str(tmp_path), "--aggregators", ",".join(METHODS), "--sb-inits", "random"]) == 0
    with open(tmp_path / "quality.csv", newline="") as fh:
        rows = {row[1]: row for row in list(csv.reader(fh))[1:]}
    assert set(METHODS) | {"fed-sb (init random)"} <= set(rows)
    assert "centralised LoRA (ceiling)" in rows and "base model (floor)" in rows
    for name, row in rows.items():
        assert math.isfinite(float(row[3])), name  # one seed: the mean alone
        assert row[-1].count("r") == len(eval_rounds(QUICK)), name  # every evaluated round, 0 included
    for name in METHODS:  # each ran at its own recommendation, recorded in the run's config
        assert float(rows[name][2]) == pytest.approx(aggregation.recommended(name).learning_rate), name
    assert (tmp_path / "quality.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "quality.json").read_text())["seeds"] == [0]

    with Session(open_database(f"sqlite:///{tmp_path / 'quality.db'}")) as s:
        for run in s.scalars(select(Run)):
            assert run.status == "completed", run.aggregator
            assert [r.num_aggregated for r in s.scalars(select(RoundRecord).where(RoundRecord.run_id == run.id))] == [3, 3]
            ok = s.scalar(select(func.count()).select_from(ClientUpdateRecord)
                          .where(ClientUpdateRecord.run_id == run.id, ClientUpdateRecord.status == "ok"))
            assert ok == 6, run.aggregator
        assert {r.aggregator for r in s.scalars(select(Run))} == set(METHODS)
        # which Fed-SB each row was: the default's LoRA-SB init, and the random ablation
        assert sorted(r.config["sb-init"] for r in s.scalars(select(Run).where(Run.aggregator == "fed-sb"))) == [
            "random", "server-public"]
    assert "sb-init server-public" in (tmp_path / "quality.md").read_text()

    # --reuse: every run of the same config is taken from the database, none runs again
    before = (tmp_path / "quality.csv").read_text()
    assert main(["--quick", "--out", str(tmp_path), "--aggregators", ",".join(METHODS), "--sb-inits", "random",
                 "--reuse"]) == 0
    with Session(open_database(f"sqlite:///{tmp_path / 'quality.db'}")) as s:
        assert s.scalar(select(func.count()).select_from(Run)) == 3
    again = {row[1]: row[3] for row in list(csv.reader((tmp_path / "quality.csv").open()))[1:]}
    assert again == {row[1]: row[3] for row in list(csv.reader(before.splitlines()))[1:]}
    # another seed is another experiment: it runs
    assert main(["--quick", "--out", str(tmp_path), "--aggregators", "fedavg", "--seeds", "1", "--reuse"]) == 0
    with Session(open_database(f"sqlite:///{tmp_path / 'quality.db'}")) as s:
        assert s.scalar(select(func.count()).select_from(Run)) == 4


def test_the_benchmark_runs_on_flowers_engine_too(tmp_path):
    assert main(["--quick", "--out", str(tmp_path), "--aggregators", "fedavg", "--engine", "flower"]) == 0
    with Session(open_database(f"sqlite:///{tmp_path / 'quality.db'}")) as s:
        (run,) = s.scalars(select(Run)).all()
    assert run.status == "completed" and run.flwr_run_id != 1  # a real SuperLink's run id


def test_references_do_not_depend_on_what_ran_before():
    # the ceiling's adapter is drawn from the seeded RNG, whatever consumed it earlier
    first, floor = references(QUICK, seed=5, ranks="2,4,8")
    torch.rand(1000)
    second, floor_again = references(QUICK, seed=5, ranks="2,4,8")
    assert first.points == second.points
    assert floor.points == floor_again.points
    assert [r for r, _ in first.points] == eval_rounds(QUICK)


def test_eval_rounds_follow_eval_every():
    from dataclasses import replace

    assert eval_rounds(replace(QUICK, rounds=5, eval_every=2)) == [0, 2, 4, 5]

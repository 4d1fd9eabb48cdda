"""The quick quality benchmark: every aggregator end to end on Flower's simulation engine.

This is also the per-aggregator end-to-end test: 2 rounds, 3 clients of ranks 2/4/8,
each run's rows checked in the database.
"""

import math

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

import aggregation
from server.db.models import ClientUpdateRecord, RoundRecord, Run
from server.db.session import open_database
from simulations.bench_quality import main

pytestmark = pytest.mark.integration


def test_quick_quality_benchmark_has_a_finite_row_per_aggregator(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    lines = (tmp_path / "quality.csv").read_text().splitlines()
    rows = {line.split(",")[0]: line.split(",") for line in lines[1:]}
    assert set(aggregation.names()) <= set(rows)
    assert "centralised LoRA (ceiling)" in rows and "base model (floor)" in rows
    for name, row in rows.items():
        assert math.isfinite(float(row[1])), name
    assert (tmp_path / "quality.png").read_bytes()[:4] == b"\x89PNG"

    with Session(open_database(f"sqlite:///{tmp_path / 'quality.db'}")) as s:
        for run in s.scalars(select(Run)):
            assert run.status == "completed", run.aggregator
            assert [r.num_aggregated for r in s.scalars(select(RoundRecord).where(RoundRecord.run_id == run.id))] == [3, 3]
            ok = s.scalar(select(func.count()).select_from(ClientUpdateRecord)
                          .where(ClientUpdateRecord.run_id == run.id, ClientUpdateRecord.status == "ok"))
            assert ok == 6, run.aggregator
        assert {r.aggregator for r in s.scalars(select(Run))} == set(aggregation.names())

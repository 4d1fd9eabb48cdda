"""The performance suite's parts that need no simulation (the rest is exercised by hand)."""

import math

import pytest
from sqlalchemy import create_engine, inspect

from server.db.session import scratch_schema
from simulations.bench_perf import db_write_time, main, wire_overhead
from tests.postgres import POSTGRES_URL, unreachable_reason


def test_wire_bytes_cover_the_payload_and_overhead_is_small():
    rows = wire_overhead()
    for name, row in rows.items():
        assert row["wire_bytes"] >= row["payload_bytes"] > 0, name
        assert row["overhead_ratio"] < 1.5, name  # framing, not a second copy of the arrays
    # Fed-SB's first message carries frozen A and B, FedAvg's the full factors: both real payloads
    assert rows["fed-sb"]["payload_bytes"] > 0


def test_db_write_time_is_measured(tmp_path):
    row = db_write_time(f"sqlite:///{tmp_path}/b.db", repeats=3)
    assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0


def test_postgres_write_time_uses_a_scratch_schema_that_is_dropped():
    reason = unreachable_reason()
    if reason:
        pytest.skip(reason)
    admin = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 5})
    before = set(inspect(admin).get_schema_names())
    with scratch_schema(POSTGRES_URL) as url:
        row = db_write_time(url, repeats=2)
        during = set(inspect(admin).get_schema_names()) - before
    assert len(during) == 1 and next(iter(during)) in url
    assert row["median_ms"] > 0
    assert set(inspect(admin).get_schema_names()) == before
    admin.dispose()


def test_unknown_section_is_refused_naming_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--sections", "2,9"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'2,9'" in err and "1 (aggregation), 2 (wire)" in err and "7 (deploy)" in err

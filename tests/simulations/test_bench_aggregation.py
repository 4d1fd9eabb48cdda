import json
import math
import subprocess
import sys
from pathlib import Path

import aggregation
from simulations import bench_aggregation

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_reports_finite_numbers_for_every_aggregator(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_aggregation.main(["--quick", "--clients", "2,3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    for name in aggregation.names():
        mine = [r for r in rows if r["aggregator"] == name]
        # 2 client counts x (uniform, mixed ranks)
        assert len(mine) == 4, name
        for row in mine:
            assert "error" not in row, row
            for column in bench_aggregation.COLUMNS:
                assert math.isfinite(row[column]) and row[column] >= 0, (name, column, row)
            assert row["up_MB"] > 0 and row["down_MB"] > 0
        assert sum(name in line.split() for line in printed.splitlines()) == 4
    assert "ERROR" not in printed


def test_runs_as_a_script():
    done = subprocess.run(
        [sys.executable, "-m", "simulations.bench_aggregation", "--quick", "--clients", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "agg_s" in done.stdout and "nan" not in done.stdout.lower()


def test_bad_client_list_is_refused(capsys):
    try:
        bench_aggregation.main(["--quick", "--clients", "ten"])
    except SystemExit as exit_:
        assert exit_.code == 2
    else:  # pragma: no cover - argparse always exits
        raise AssertionError("expected argparse to exit")
    assert "ten" in capsys.readouterr().err

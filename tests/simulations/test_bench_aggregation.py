import json
import math
import subprocess
import sys
from pathlib import Path

import aggregation
from aggregation import ClientInfo, ModelSpec, ModuleShape
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
                if column == "rel_err" and keeps_factors_on_the_nodes(name):
                    assert row[column] is None  # its clients' adapters are unknown on the server
                    continue
                assert math.isfinite(row[column]) and row[column] >= 0, (name, column, row)
            assert row["up_MB"] > 0 and row["down_MB"] > 0
        assert sum(name in line.split() for line in printed.splitlines()) == 4
    assert "ERROR" not in printed


def keeps_factors_on_the_nodes(name: str) -> bool:
    agg = aggregation.create(name)
    spec = ModelSpec(modules={"m": ModuleShape(d_out=8, d_in=8)}, max_rank=4)
    return bool(agg.downlink(agg.init_state(spec), ClientInfo("n", 2, 4.0)).personal(agg.uplink))


def test_methods_runs_only_the_named_aggregators(tmp_path):
    out = tmp_path / "bench.json"
    assert bench_aggregation.main(["--quick", "--clients", "2", "--methods", "rolora,fedsvd", "--json", str(out)]) == 0
    assert {r["aggregator"] for r in json.loads(out.read_text())["rows"]} == {"rolora", "fedsvd"}


def test_an_unknown_method_is_refused_naming_the_valid_ones(capsys):
    try:
        bench_aggregation.main(["--quick", "--methods", "rolora,nope"])
    except SystemExit as exit_:
        assert exit_.code == 2
    else:  # pragma: no cover - argparse always exits
        raise AssertionError("expected argparse to exit")
    err = capsys.readouterr().err
    assert "'nope'" in err and "fedsvd" in err


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

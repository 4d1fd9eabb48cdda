import json
import math

import pytest

from simulations import bench_dp


def test_quick_benchmark_reports_every_mode_against_plain(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_dp.main(["--quick", "--seq-len", "32", "--modes", "plain,hooks,ghost", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = {row["mode"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"plain", "hooks", "ghost"}
    for mode, row in rows.items():
        assert "error" not in row, row
        for column in bench_dp.COLUMNS:
            assert math.isfinite(row[column]), (mode, column, row)
        assert row["step_s"] > 0 and row["peak_rss_MB"] > 0
        assert sum(line.split()[:1] == [mode] for line in printed.splitlines()) == 1
    assert rows["plain"]["x_plain"] == 1.0
    assert "ERROR" not in printed and "x_plain" in printed


@pytest.mark.parametrize("args, needle", [(["--modes", "hooks"], "'plain' is required"),
                                          (["--modes", "plain,xla"], "'xla'"),
                                          (["--batch", "0"], "--batch")])
def test_bad_arguments_are_refused(capsys, args, needle):
    with pytest.raises(SystemExit) as exit_:
        bench_dp.main(["--quick", *args])
    assert exit_.value.code == 2
    assert needle in capsys.readouterr().err

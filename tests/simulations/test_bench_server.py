"""The server-math section of the performance suite: registered, and its standalone part measures."""

import math

from simulations.bench_perf import SECTIONS
from simulations.bench_server import show, standalone_figures


def test_the_section_is_registered_in_the_suite():
    assert any(section.key == "server" for section in SECTIONS.values())


def test_standalone_figures_cover_each_init_and_the_aggregation_with_and_without_the_limit(capsys):
    rows = standalone_figures(layers=1, repeat=1)
    assert set(rows) == {"init_random", "init_server_public_svds", "init_federated_server", "aggregate_10_clients"}
    for row in rows.values():
        assert math.isfinite(row["limited_s"]) and row["limited_s"] > 0
        assert math.isfinite(row["unlimited_s"]) and row["unlimited_s"] > 0
    show({"standalone": rows, "simulation": [{"init": "random", "server_threads": 0, "error": "skipped"}]})
    assert "init_random" in capsys.readouterr().out

"""Seeds -> mean ± std, the verdict rule against FedAvg, and the claim lines."""

import math

import pytest

from simulations.quality_stats import Curve, claims, compare, summarise, write_outputs


def curves(name, finals, *, mb_up=1.0):
    return [Curve(name=name, points=((0, 100.0), (2, f)), mb_up=mb_up, wall_s=1.0, status="completed", lr=1e-3)
            for f in finals]


def test_summary_is_mean_and_sample_std_per_round():
    s = summarise(curves("fedavg", [50.0, 52.0, 54.0]))
    assert s.final_mean == pytest.approx(52.0) and s.final_std == pytest.approx(2.0)
    assert s.rounds == ((0, 100.0, 0.0), (2, 52.0, pytest.approx(2.0)))
    assert math.isnan(summarise(curves("fedavg", [50.0])).final_std)  # one seed: no spread


@pytest.mark.parametrize("finals, verdict", [
    ([40.0, 41.0, 42.0], "better"),       # 11 apart, stds 1 and 2
    ([51.0, 53.0, 55.0], "within noise"),  # 1 apart: inside both stds
    ([30.0, 42.0, 54.0], "within noise"),  # 10 apart: beyond FedAvg's std 2, not its own 12
    ([60.0, 61.0, 62.0], "worse"),
])
def test_better_only_beyond_both_stds(finals, verdict):
    base = summarise(curves("fedavg", [50.0, 52.0, 54.0]))
    method = summarise(curves("m", finals))
    assert compare(method, base) == verdict


def test_one_seed_cannot_tell():
    assert compare(summarise(curves("m", [1.0])), summarise(curves("fedavg", [50.0]))).startswith("cannot tell")


def test_claims_confirm_refute_or_cannot_tell(tmp_path):
    base = summarise(curves("fedavg", [50.0, 52.0, 54.0], mb_up=10.0))
    tables = {
        "mixed ranks 2,4,8,16": [base, summarise(curves("flora", [40.0, 41.0, 42.0])),
                                 summarise(curves("lora-fair", [60.0, 61.0, 62.0])),
                                 summarise(curves("fed-sb", [51.0, 52.0, 53.0], mb_up=0.1))],
        "homogeneous ranks 8,8,8,8": [base, summarise(curves("fed-sb", [70.0, 71.0, 72.0], mb_up=0.1))],
        "mixed ranks 2,4,8,16, DP ε=8": [base, summarise(curves("fed-sb", [1.0, 1.0, 1.0]))],
    }
    got = {(c["claim"], c["scenario"]): c["verdict"] for c in claims(tables)}
    assert got == {
        ("FLoRA beats FedAvg with mixed ranks", "mixed ranks 2,4,8,16"): "confirms",
        ("LoRA-FAIR beats FedAvg", "mixed ranks 2,4,8,16"): "refutes",
        ("Fed-SB matches FedAvg at a fraction of the upload", "mixed ranks 2,4,8,16"): "confirms",
        ("Fed-SB matches FedAvg at a fraction of the upload", "homogeneous ranks 8,8,8,8"): "refutes",
    }
    md = write_outputs(tables, claims(tables), tmp_path, "test").read_text()
    assert "52.0 ± 2.0" in md and "**refutes**" in md
    assert (tmp_path / "quality.png").read_bytes()[:4] == b"\x89PNG"

"""The tuning sweep: it never sees the held-out evaluation rows, and its choices are what the classes carry."""

import json
import math
from pathlib import Path

import pytest

import aggregation
from core.data import load_examples, load_jsonl, split_heldout
from simulations.tune import BENCH_SEEDS, EVAL_FRACTION, GRIDS, grid_for, main, validation_pool, write_pool

TUNING = Path(__file__).resolve().parents[2] / "simulations" / "tuning.json"


def test_validation_pool_holds_no_heldout_row_of_any_benchmark_seed(tmp_path):
    examples = load_examples("chatterbot")
    pool = validation_pool(examples)
    for seed in BENCH_SEEDS:
        _, heldout = split_heldout(examples, EVAL_FRACTION, seed)
        assert not set(heldout) & set(pool), seed
    assert len(pool) > len(examples) // 2
    # the file simulate reads back is the same rows (the partitioner needs their category)
    assert load_jsonl(write_pool(pool, tmp_path / "pool.jsonl")) == [
        type(ex)(ex.prompt, ex.response, category=ex.category, source="pool.jsonl") for ex in pool]


def test_fed_sb_sweeps_the_r_grid_and_lora_methods_the_lora_grid():
    assert grid_for("fed-sb", ()) == GRIDS["bra"] and grid_for("fedavg", ()) == GRIDS["lora"]
    assert grid_for("fed-sb", (0.5,)) == (0.5,)


@pytest.mark.skipif(not TUNING.exists(), reason="no sweep recorded yet")
def test_every_tuned_method_carries_the_chosen_rate():
    for name, result in json.loads(TUNING.read_text())["methods"].items():
        assert aggregation.recommended(name).learning_rate == pytest.approx(result["chosen"]), name
        assert "simulations/tuning.json" in aggregation.recommended(name).source, name
        # the init step the sweep held fixed is the one the method recommends with its rate
        assert aggregation.recommended(name).init_learning_rate == pytest.approx(
            result.get("init_learning_rate", 0.0)), name


def test_a_sweep_runs_each_rate_on_the_validation_file_and_picks_the_lowest(tmp_path, monkeypatch):
    # the runs are bench_quality's run_one (a real simulation each: tests/simulations/
    # test_bench_quality.py runs it); here each rate's run is recorded and answered with a
    # made-up curve, so what is checked is what the sweep asks for and what it makes of it
    import simulations.tune as tune
    from simulations.quality_stats import Curve

    asked = []
    ppl = {0.001: 30.0, 0.003: 20.0, 0.05: math.nan}  # 0.05 "failed": never chosen

    def fake_run(name, args, out):
        lr = float(args[args.index("--lr") + 1])
        asked.append((name, lr, args[args.index("--data") + 1]))
        points = ((0, 40.0), (1, ppl[lr])) if math.isfinite(ppl[lr]) else ()
        return Curve(name=name, points=points, mb_up=1.0, wall_s=1.0, status="completed", lr=lr)

    monkeypatch.setattr(tune, "run_one", fake_run)
    write = tmp_path / "tuning"
    assert main(["--quick", "--methods", "fedavg", "--grid", "0.001,0.003,0.05", "--rounds", "1",
                 "--out", str(tmp_path / "scratch"), "--write", str(write)]) == 0
    data = str(tmp_path / "scratch" / "train-only.jsonl")
    assert asked == [("fedavg", 0.001, data), ("fedavg", 0.003, data), ("fedavg", 0.05, data)]
    result = json.loads(write.with_suffix(".json").read_text())["methods"]["fedavg"]
    assert result["chosen"] == 0.003 and not result["at_grid_edge"]
    assert math.isnan(result["grid"]["0.05"]) and result["grid"]["0.003"] == 20.0
    assert "| fedavg |" in write.with_suffix(".md").read_text() and "0.003: 20.0" in write.with_suffix(".md").read_text()
    # the validation file is the sweep's pool, not the benchmark's held-out rows
    pool = validation_pool(load_examples("chatterbot"))
    assert [(e.prompt, e.response) for e in load_jsonl(Path(data))] == [(e.prompt, e.response) for e in pool]


def test_the_fed_sb_sweep_holds_the_init_step_and_records_it(tmp_path, monkeypatch):
    # R's rate moves alone: a LoRA-SB sign step at R's rate had wrecked the model before training
    import simulations.tune as tune
    from simulations.quality_stats import Curve

    seen = []

    def fake_run(name, args, out):
        seen.append(args[args.index("--sb-init-lr") + 1] if "--sb-init-lr" in args else None)
        return Curve(name=name, points=((0, 40.0), (1, 20.0)), mb_up=1.0, wall_s=1.0, status="completed", lr=0.1)

    monkeypatch.setattr(tune, "run_one", fake_run)
    write = tmp_path / "tuning"
    assert main(["--quick", "--methods", "fed-sb,fedavg", "--grid", "0.01", "--rounds", "1",
                 "--out", str(tmp_path / "scratch"), "--write", str(write)]) == 0
    assert seen == [str(tune.INIT_STEP["bra"]), None]
    methods = json.loads(write.with_suffix(".json").read_text())["methods"]
    assert methods["fed-sb"]["init_learning_rate"] == tune.INIT_STEP["bra"]
    assert methods["fedavg"]["init_learning_rate"] == 0.0
    assert "sb-init-lr held at 0.001" in write.with_suffix(".md").read_text()


def test_a_widened_sweep_runs_only_the_new_points_and_chooses_over_all(tmp_path, monkeypatch):
    import simulations.tune as tune
    from simulations.quality_stats import Curve

    ppl = {0.001: 30.0, 0.003: 20.0, 0.01: 25.0}
    asked = []

    def fake_run(name, args, out):
        lr = float(args[args.index("--lr") + 1])
        asked.append(lr)
        return Curve(name=name, points=((0, 40.0), (1, ppl[lr])), mb_up=1.0, wall_s=1.0, status="completed", lr=lr)

    monkeypatch.setattr(tune, "run_one", fake_run)
    write, scratch = tmp_path / "tuning", str(tmp_path / "scratch")
    common = ["--quick", "--methods", "fedavg", "--rounds", "1", "--out", scratch, "--write", str(write)]
    assert main([*common, "--grid", "0.001,0.003"]) == 0
    first = json.loads(write.with_suffix(".json").read_text())["methods"]["fedavg"]
    assert first["chosen"] == 0.003 and first["at_grid_edge"]  # best at the edge: widen
    assert main([*common, "--grid", "0.003,0.01"]) == 0
    assert asked == [0.001, 0.003, 0.01]  # 0.003 was not run twice
    second = json.loads(write.with_suffix(".json").read_text())["methods"]["fedavg"]
    assert list(second["grid"]) == ["0.001", "0.003", "0.01"]
    assert second["chosen"] == 0.003 and not second["at_grid_edge"]
    # another size is another sweep: nothing carried over
    assert main([*common[:4], "2", *common[5:], "--grid", "0.01"]) == 0
    assert json.loads(write.with_suffix(".json").read_text())["methods"]["fedavg"]["grid"] == {"0.01": 25.0}

"""The tuning sweep: it never sees the held-out evaluation rows, and its choices are what the classes carry."""

import json
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


@pytest.mark.integration
def test_quick_sweep_writes_the_table_and_picks_the_lowest(tmp_path):
    write = tmp_path / "tuning"
    assert main(["--quick", "--methods", "fedavg", "--grid", "0.001,0.05", "--rounds", "1",
                 "--out", str(tmp_path / "scratch"), "--write", str(write)]) == 0
    result = json.loads(write.with_suffix(".json").read_text())["methods"]["fedavg"]
    assert set(result["grid"]) == {"0.001", "0.05"}
    assert result["chosen"] == float(min(result["grid"], key=result["grid"].get))
    assert "| fedavg |" in write.with_suffix(".md").read_text()

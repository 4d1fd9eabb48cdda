"""DP settings: run config, node-config overrides, validation, CLI flags, pyproject."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from privacy.settings import DPSettings, local_dp, parse_run_config
from cli.app import main
from core.config import RunConfig

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_declares_every_dp_key_with_dp_off():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    dp_keys = {k for k in RunConfig().to_flower() if k.startswith("dp-")}
    assert dp_keys <= set(config)
    cfg = RunConfig.from_flower(config)
    assert local_dp(cfg.to_flower()) is None and cfg.dp_central_clip == 0


def test_run_config_turns_dp_on_and_node_config_overrides_it():
    run = RunConfig(dp_epsilon=8.0, dp_max_grad_norm=0.5).to_flower()
    settings = local_dp(run)
    assert settings == DPSettings(epsilon=8.0, max_grad_norm=0.5)
    node = local_dp(run, {"dp-epsilon": 2, "dp-accountant": "rdp", "partition-id": 0})
    assert node.epsilon == 2.0 and node.accountant == "rdp" and node.max_grad_norm == 0.5
    # a node can switch DP on by itself, and off again (0 = off)
    assert local_dp(RunConfig().to_flower(), {"dp-noise-multiplier": 1.2}).noise_multiplier == 1.2
    assert local_dp(run, {"dp-epsilon": 0}) is None


def test_node_config_may_not_touch_central_dp_or_pass_nonsense():
    run = RunConfig(dp_epsilon=8.0).to_flower()
    with pytest.raises(ValueError, match="dp-central-clip"):
        local_dp(run, {"dp-central-clip": 5.0})
    with pytest.raises(ValueError, match="node config dp-delta: 'tiny'"):
        local_dp(run, {"dp-delta": "tiny"})
    with pytest.raises(ValueError, match="dp-on-budget policy 'maybe'"):
        local_dp(run, {"dp-on-budget": "maybe"})


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"dp_epsilon": -1.0}, "dp-epsilon must be"),
        ({"dp_epsilon": 1.0, "dp_delta": 1.0}, "dp-delta must be in (0, 1)"),
        ({"dp_noise_multiplier": 1.0, "dp_max_grad_norm": 0.0}, "dp-max-grad-norm"),
        ({"dp_epsilon": 1.0, "dp_accountant": "gdp"}, "'gdp'"),
        ({"dp_epsilon": 1.0, "dp_grad_sample_mode": "ew"}, "'ew'"),
        ({"dp_central_noise": 1.0}, "needs dp-central-clip"),
        ({"dp_central_clip": -2.0}, "-2.0"),
        ({"dp_central_clip": 1.0, "aggregator": "hetlora"}, "'hetlora'"),
    ],
)
def test_bad_dp_values_are_named(kwargs, needle):
    with pytest.raises(ValueError) as err:
        parse_run_config(RunConfig(**kwargs).to_flower())
    assert needle in str(err.value)


def test_every_config_key_maps_to_a_settings_field_and_a_run_config_field():
    import dataclasses

    from privacy.settings import CENTRAL_KEYS, LOCAL_KEYS

    names = {f.name for f in dataclasses.fields(DPSettings)}
    assert {name for name, _ in LOCAL_KEYS.values()} <= names
    assert set(CENTRAL_KEYS) == {"dp-central-clip", "dp-central-noise", "dp-central-epsilon"}
    assert set(LOCAL_KEYS) | set(CENTRAL_KEYS) == {
        k for k in RunConfig().to_flower() if k.startswith("dp-")
    }


@pytest.mark.parametrize(
    "node, needles",
    [
        ({"dp-epsion": 2}, ["'dp-epsion' is not a DP setting", "valid: dp-epsilon, dp-delta", "dp-state-dir"]),
        ({"dp-epsilon": "abc"}, ["node config dp-epsilon: 'abc' is not valid (expected a number)"]),
        ({"dp-epsilon": True}, ["node config dp-epsilon: True", "boolean"]),
        ({"dp-central-noise": 1.0}, ["'dp-central-noise'", "run-wide"]),
        # DP off on the node itself, but the run may switch it on: its knobs are checked now
        ({"dp-delta": 2}, ["dp-delta must be in (0, 1)", "2"]),
        ({"dp-accountant": "gdp"}, ["'gdp'", "prv"]),
    ],
)
def test_a_node_config_with_an_unknown_or_unparsable_dp_key_is_refused(node, needles):
    from privacy.settings import check_node_config

    with pytest.raises(ValueError) as err:
        check_node_config({"lora-rank": 4, "data-path": "/data.jsonl", **node})
    for needle in needles:
        assert needle in str(err.value)
    if "dp-delta" not in node and "dp-accountant" not in node:  # those two only matter once DP is on
        with pytest.raises(ValueError):
            local_dp(RunConfig(dp_epsilon=8.0).to_flower(), node)


def test_a_valid_node_config_passes_and_other_keys_are_not_dp_business():
    from privacy.settings import check_node_config

    check_node_config({"lora-rank": 4, "partition-id": 0, "device": "cpu", "dp-epsilon": 2, "dp-delta": 1e-6,
                       "dp-accountant": "rdp", "dp-state-dir": "/var/dp"})
    check_node_config({})


def test_dp_off_ignores_the_other_keys():
    assert local_dp(RunConfig(dp_delta=0.0, dp_accountant="anything").to_flower()) is None


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--dp-epsilon", "4", "--dp-accountant", "gdp"], "'gdp'"),
        (["--dp-epsilon", "4", "--dp-on-budget", "later"], "'later'"),
        (["--aggregator", "flora", "--dp-central-clip", "1", "--dp-central-noise", "1"], "concatenation"),
    ],
)
def test_simulate_flags_are_validated_before_anything_starts(tmp_path, capsys, args, needle):
    code = main(["simulate", "--model", "tiny", "--db", f"sqlite:///{tmp_path}/x.db", "--home", str(tmp_path), *args])
    assert code == 2
    assert needle in capsys.readouterr().out


def test_default_ledger_directory_is_under_the_project_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "cache"))
    assert DPSettings(epsilon=1.0).ledger_directory() == (tmp_path / "cache").resolve() / "privacy"
    assert DPSettings(epsilon=1.0, state_dir=str(tmp_path / "x")).ledger_directory() == tmp_path / "x"

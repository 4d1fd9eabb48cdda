"""One declaration of the run config reaches every entry point: flags, --set, pyproject, Flower."""

from __future__ import annotations

import tomllib

import pytest

from cli import APP_DIR, run_config
from cli.app import build_parser
from cli.simulate import OWN_KEYS, config_from_args
from core.config import RunConfig

DECLARED = RunConfig.settings()
OFFERED = [key for key, d in DECLARED.items() if not d.metadata["internal"] and key not in OWN_KEYS]


def _simulate(*argv: str):
    return build_parser().parse_args(["simulate", *argv])


def test_pyproject_defaults_are_the_declared_defaults():
    # `flwr run .` reads [tool.flwr.app.config]; it must hold every key, at the declared default
    pyproject = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert sorted(pyproject) == sorted(DECLARED)
    assert RunConfig.from_flower(pyproject) == RunConfig()


@pytest.mark.parametrize("key", OFFERED)
def test_every_key_is_a_simulate_flag_and_reaches_the_run_config(key):
    declared = DECLARED[key]
    value = {"int": "7", "float": "0.5", "str": "x"}[declared.type]
    assert run_config.overrides(_simulate(f"--{key}", value)) == {key: value}


@pytest.mark.parametrize("key", list(DECLARED))
def test_every_key_can_be_set_with_set(key):
    assert run_config.overrides(_simulate("--set", f"{key}=3")) == {key: 3}


def test_aliases_keep_the_old_spellings():
    args = _simulate("--rounds", "5", "--lr", "0.01", "--alpha", "8", "--db", "sqlite:///x.db")
    assert run_config.overrides(args) == {"num-server-rounds": "5", "learning-rate": "0.01", "lora-alpha": "8",
                                          "db-url": "sqlite:///x.db"}


def test_simulate_builds_a_checked_config_from_flags_and_set(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n')
    cfg = config_from_args(_simulate("--num-clients", "3", "--rounds", "2", "--set", "local-steps=5",
                                     "--data", str(data),
                                     "--dp-state-dir", "rel/ledgers"))
    assert (cfg.num_server_rounds, cfg.local_steps, cfg.simulation_nodes) == (2, 5, 3)
    assert cfg.run_tag and cfg.db_url  # generated, absolute
    assert cfg.dp_state_dir.startswith("/")  # a directory path is made absolute: the apps run elsewhere


@pytest.mark.parametrize("argv, needle", [
    (["--set", "no-such-key=1"], "unknown run-config key 'no-such-key'"),
    (["--set", "simulation-nodes=2"], "simulation-nodes"),
    (["--local-steps", "many"], "local-steps"),
    (["--dp-epsilon", "-1"], "dp-epsilon"),
])
def test_bad_keys_and_values_are_named(argv, needle):
    with pytest.raises(ValueError, match=needle):
        config_from_args(_simulate("--num-clients", "2", *argv))

"""Deployment commands: bad input stops them within seconds with the offending value named,
before any Flower process starts; helpers produce what Flower 1.41 reads."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time

import pytest

from core.data import load_examples
from cli.client import device_env, node_config
from cli.certs import generate_node_keys
from cli.app import main
from cli.submit import run_overrides
from cli.flower import Daemon, write_connection
from cli.run_config import parse_assignment
from cli.local_superlink import free_port

FAST = 15.0  # seconds; every failure below must be reported well within this


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = load_examples("chatterbot")[:5]
    path.write_text("".join(json.dumps({"instruction": e.prompt, "output": e.response}) + "\n" for e in rows))
    return path


@pytest.fixture
def node_home(tmp_path):
    home = tmp_path / "node"
    generate_node_keys(home)
    return home


def fails(capsys, args: list[str], *needles: str) -> str:
    started = time.monotonic()
    code = main([str(a) for a in args])
    out = capsys.readouterr().out.replace("\n", "")
    assert code == 2, out
    for needle in needles:
        assert needle in out, out
    assert time.monotonic() - started < FAST
    return out


def dead_address() -> str:
    return f"127.0.0.1:{free_port()}"


# --- client start ---------------------------------------------------------------------------


def _start(home, data, *extra, coordinator=None, ca=None):
    return ["client", "start", "--coordinator", coordinator or dead_address(), "--home", home, "--data", data,
            *(["--ca", ca] if ca else ["--insecure"]), *extra]


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--rank", "0"], "rank 0"),
        (["--rank", "65"], "rank 65"),
        (["--rank", "20", "--max-rank", "16"], "1..16"),
        (["--rank", "4", "--device", "gpu"], "'gpu'"),
        (["--rank", "4", "--set", "lora-rank=8"], "'lora-rank=8'"),
        (["--rank", "4", "--alpha", "-1"], "-1"),
        (["--rank", "4", "--eval-fraction", "1"], "--eval-fraction must be in (0, 1), got 1.0"),
        (["--rank", "4", "--eval-fraction", "0"], "--eval-fraction must be in (0, 1), got 0.0"),
    ],
)
def test_client_start_refuses_bad_node_config(capsys, node_home, data_file, extra, needle):
    fails(capsys, _start(node_home, data_file, *extra), needle)
    assert not (node_home / "flwr").exists()  # nothing was launched


@pytest.mark.parametrize(
    "assignment, needles",
    [
        ("dp-epsion=2", ["'dp-epsion'", "valid: dp-epsilon, dp-delta"]),  # misspelt: it must not be ignored
        ("dp-epsilon=abc", ["dp-epsilon", "'abc'"]),
        ("dp-delta=2", ["dp-delta", "(0, 1)"]),
    ],
)
def test_client_start_refuses_an_unknown_or_unparsable_dp_key(capsys, node_home, data_file, assignment, needles):
    fails(capsys, _start(node_home, data_file, "--rank", "4", "--set", "dp-epsilon=2", "--set", assignment),
          *needles)
    assert not (node_home / "flwr").exists()  # nothing was launched


def test_client_start_names_a_missing_data_file(capsys, node_home, tmp_path):
    fails(capsys, _start(node_home, tmp_path / "missing.jsonl", "--rank", "4"), "missing.jsonl")


def test_client_start_names_a_malformed_data_row(capsys, node_home, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "no output"}\n')
    fails(capsys, _start(node_home, bad, "--rank", "4"), "bad.jsonl:2", "'output'")


def test_client_start_names_a_missing_key_file(capsys, tmp_path, data_file):
    fails(capsys, _start(tmp_path / "empty-home", data_file, "--rank", "4"), str(tmp_path / "empty-home" / "node.key"))
    fails(capsys, _start(tmp_path, data_file, "--rank", "4", "--key", tmp_path / "k.key"), str(tmp_path / "k.key"))


def test_client_start_names_a_corrupt_key_file(capsys, tmp_path, data_file):
    key = tmp_path / "node.key"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnope\n")
    fails(capsys, _start(tmp_path, data_file, "--rank", "4"), str(key))


def test_client_start_names_an_address_that_does_not_answer(capsys, node_home, data_file, pki):
    address = dead_address()
    fails(capsys, _start(node_home, data_file, "--rank", "4", coordinator=address, ca=pki.ca_cert),
          f"'{address}' does not answer")
    assert not (node_home / "flwr").exists()


def test_client_start_names_a_wrong_ca(capsys, node_home, data_file, tls_address, other_ca):
    fails(capsys, _start(node_home, data_file, "--rank", "4", coordinator=tls_address, ca=other_ca),
          "not trusted", str(other_ca))


def test_client_start_names_a_missing_ca_file(capsys, node_home, data_file, tmp_path):
    fails(capsys, _start(node_home, data_file, "--rank", "4", ca=tmp_path / "ca.crt"), str(tmp_path / "ca.crt"))


# --- client enroll --------------------------------------------------------------------------


def test_enroll_refuses_a_bad_name(capsys, tmp_path, pki):
    fails(capsys, ["client", "enroll", "--name", "bad name", "--home", tmp_path, "--ca", pki.ca_cert], "'bad name'")


def test_enroll_names_an_address_that_does_not_answer(capsys, tmp_path, pki):
    address = dead_address()
    fails(capsys, ["client", "enroll", "--name", "n1", "--home", tmp_path, "--coordinator", address,
                   "--ca", pki.ca_cert], f"'{address}' does not answer")


def test_enroll_names_a_wrong_ca(capsys, tmp_path, tls_address, other_ca):
    fails(capsys, ["client", "enroll", "--name", "n1", "--home", tmp_path, "--coordinator", tls_address,
                   "--ca", other_ca], "not trusted", str(other_ca))


def test_enroll_needs_a_ca_or_insecure(capsys, tmp_path, pki):
    fails(capsys, ["client", "enroll", "--name", "n1", "--home", tmp_path], "--ca is required")
    fails(capsys, ["client", "enroll", "--name", "n1", "--home", tmp_path, "--insecure", "--ca", pki.ca_cert],
          "contradict")


# --- run -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--set", "bogus=1"], "'bogus'"),
        (["--set", "ranks=4,999"], "rank 999"),
        (["--aggregator", "nope"], "'nope'"),
        (["--rounds", "0"], "num-server-rounds"),
        (["--set", "novalue"], "'novalue'"),
    ],
)
def test_run_validates_the_run_config_before_submitting(capsys, tmp_path, extra, needle):
    fails(capsys, ["run", "--home", tmp_path / "cli", "--insecure", "--coordinator", dead_address(), *extra], needle)
    assert not (tmp_path / "cli").exists()


def test_run_names_an_address_that_does_not_answer(capsys, tmp_path, pki):
    address = dead_address()
    fails(capsys, ["run", "--home", tmp_path, "--coordinator", address, "--ca", pki.ca_cert],
          f"'{address}' does not answer")


def test_run_names_a_wrong_ca(capsys, tmp_path, tls_address, other_ca):
    fails(capsys, ["run", "--home", tmp_path, "--coordinator", tls_address, "--ca", other_ca],
          "not trusted", str(other_ca))


# --- coordinator start -----------------------------------------------------------------------


def _coordinator(tmp_path, *extra):
    return ["coordinator", "start", "--host", "127.0.0.1", "--port", free_port(), "--home", tmp_path / "home",
            "--db", f"sqlite:///{tmp_path}/runs.db", *extra]


def test_coordinator_refuses_node_auth_without_tls(capsys, tmp_path):
    fails(capsys, _coordinator(tmp_path, "--insecure"), "--no-node-auth")
    assert not (tmp_path / "home").exists()


def test_coordinator_names_missing_tls_files(capsys, tmp_path, pki):
    fails(capsys, _coordinator(tmp_path, "--ca", pki.ca_cert), "missing --cert, --key")
    fails(capsys, _coordinator(tmp_path, "--ca", pki.ca_cert, "--cert", tmp_path / "s.crt", "--key", pki.server_key),
          str(tmp_path / "s.crt"))


def test_coordinator_names_a_busy_port(capsys, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        fails(capsys, ["coordinator", "start", "--host", "127.0.0.1", "--port", port, "--home", tmp_path / "home",
                       "--db", f"sqlite:///{tmp_path}/runs.db"], f"127.0.0.1:{port}")


def test_coordinator_names_an_unusable_database(capsys, tmp_path):
    fails(capsys, _coordinator(tmp_path, "--db", "postgresql+psycopg2://u:secret@127.0.0.1:1/x"), "127.0.0.1:1/x")
    assert "secret" not in capsys.readouterr().out


# --- helpers: what Flower reads ---------------------------------------------------------------


def test_connection_config_is_read_by_flower(tmp_path, monkeypatch, pki):
    from flwr.cli.flower_config import read_superlink_connection

    name = write_connection(tmp_path, address="coordinator:9093", ca=pki.ca_cert)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    connection = read_superlink_connection(name)
    assert connection.address == "coordinator:9093"
    assert connection.root_certificates == str(pki.ca_cert)
    assert not connection.insecure


def test_node_config_passes_dp_keys_through(data_file):
    config = node_config(rank=8, max_rank=64, data=str(data_file), alpha=32.0, device="cpu",
                         extra=["dp-noise-multiplier=1.1", "dp-accountant=prv"])
    assert config == {"lora-rank": 8, "data-path": str(data_file), "device": "cpu", "lora-alpha": 32.0,
                      "dp-noise-multiplier": 1.1, "dp-accountant": "prv"}


def test_node_config_carries_the_nodes_own_held_out_share_under_the_key_the_node_reads(data_file):
    from client.node import NODE_EVAL_FRACTION

    config = node_config(rank=4, max_rank=64, data=str(data_file), alpha=None, device="cpu", extra=[],
                         eval_fraction=0.25)
    assert config[NODE_EVAL_FRACTION] == 0.25
    assert NODE_EVAL_FRACTION not in node_config(rank=4, max_rank=64, data=str(data_file), alpha=None,
                                                 device="cpu", extra=[])  # the run's node-eval-fraction applies


def test_node_config_file_is_parsed_by_flower(tmp_path, data_file):
    from flwr.common.config import parse_config_args

    from cli.flower import write_toml

    config = node_config(rank=4, max_rank=64, data=str(data_file), alpha=None, device="auto",
                         extra=['dp-state-dir=say "hi"'])
    assert parse_config_args([str(write_toml(tmp_path / "node-config.toml", config))]) == config


@pytest.mark.parametrize("device, env", [("auto", {}), ("cuda", {}), ("cpu", {"CUDA_VISIBLE_DEVICES": ""}),
                                         ("cuda:1", {"CUDA_VISIBLE_DEVICES": "1"})])
def test_device_maps_to_visible_gpus(device, env):
    assert device_env(device) == env


@pytest.mark.parametrize("text, expected", [("a=1", ("a", 1)), ("a=0.5", ("a", 0.5)), ("a=true", ("a", True)),
                                            ("a=tiny", ("a", "tiny")), ("a=4,8", ("a", "4,8")),
                                            ('a="x y"', ("a", "x y"))])
def test_assignments_parse_toml_literals_or_strings(text, expected):
    assert parse_assignment(text, option="--set") == expected


def test_run_overrides_map_named_options_to_run_config_keys():
    import argparse

    args = argparse.Namespace(overrides=["model=tiny"], rounds=2, aggregator="flora", db="sqlite:///x.db")
    overrides = run_overrides(args)
    assert overrides["num-server-rounds"] == 2 and overrides["aggregator"] == "flora"
    assert overrides["db-url"] == "sqlite:///x.db" and overrides["model"] == "tiny"
    assert len(overrides["run-tag"]) == 16


def test_daemon_forwards_sigterm_and_returns_the_exit_code():
    script = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(7)); "
              "print('up', flush=True); time.sleep(60)")
    daemon = Daemon(command=[sys.executable, "-c", script], env=dict(os.environ), ready_line="up")
    daemon.start()
    daemon.wait_ready(daemon.ready.is_set, timeout=30, what="child")

    def terminate_when_forwarding() -> None:  # as docker stop / Ctrl-C would, once wait() listens
        deadline = time.monotonic() + 20
        while signal.getsignal(signal.SIGTERM) != daemon._forward and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_when_forwarding, daemon=True).start()
    assert daemon.wait() == 7


# --- the public front and enrollment (issue 17): refused within seconds, values named -----------


def test_daemon_reports_a_forwarded_sigterm_as_143_like_a_shell():
    script = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(241)); "
              "print('up', flush=True); time.sleep(60)")  # 241: what flower-superlink exits with
    daemon = Daemon(command=[sys.executable, "-c", script], env=dict(os.environ), ready_line="up")
    daemon.start()
    daemon.wait_ready(daemon.ready.is_set, timeout=30, what="child")

    def terminate_when_forwarding() -> None:
        deadline = time.monotonic() + 20
        while signal.getsignal(signal.SIGTERM) != daemon._forward and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_when_forwarding, daemon=True).start()
    assert daemon.exit_status() == 128 + signal.SIGTERM
    assert daemon.signalled == signal.SIGTERM


def test_coordinator_ports_must_differ(capsys, tmp_path):
    port = free_port()
    fails(capsys, ["coordinator", "start", "--host", "127.0.0.1", "--port", port, "--local-port", port,
                   "--home", tmp_path / "home", "--db", f"sqlite:///{tmp_path}/runs.db"], f"--local-port {port}")


def test_coordinator_names_a_busy_loopback_port(capsys, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        fails(capsys, _coordinator(tmp_path, "--local-port", port), f"127.0.0.1:{port}")


def test_invite_writes_a_private_token_file_once(capsys, tmp_path):
    token_file = tmp_path / "node" / "enroll.token"
    args = ["coordinator", "invite", "--name", "hospital-a", "--home", tmp_path / "home", "--token-file", token_file]
    assert main([str(a) for a in args]) == 0
    token = token_file.read_text().strip()
    assert len(token) >= 43 and token_file.stat().st_mode & 0o777 == 0o600
    assert token not in capsys.readouterr().out  # the file holds it, not the terminal
    assert main([str(a) for a in args]) == 0  # a re-run setup script keeps the invitation it issued
    assert token_file.read_text().strip() == token and "keeping" in capsys.readouterr().out


@pytest.mark.parametrize("extra, needle", [(["--name", "bad name"], "'bad name'"),
                                           (["--name", "n1", "--valid-for", "2 weeks"], "'2 weeks'")])
def test_invite_names_bad_values(capsys, tmp_path, extra, needle):
    fails(capsys, ["coordinator", "invite", "--home", tmp_path, *extra], needle)


@pytest.mark.parametrize("command", [["register", "--name", "n1", "--public-key", "PUB"], ["nodes"],
                                     ["revoke", "n1"]])
def test_operator_commands_name_a_home_where_no_coordinator_started(capsys, tmp_path, command):
    pub = generate_node_keys(tmp_path / "node").public
    argv = [str(pub) if a == "PUB" else a for a in command]
    fails(capsys, ["coordinator", *argv, "--home", tmp_path / "nowhere"], str(tmp_path / "nowhere" / "endpoints.json"))


def test_register_names_a_missing_public_key(capsys, tmp_path):
    fails(capsys, ["coordinator", "register", "--name", "n1", "--public-key", tmp_path / "node.pub",
                   "--home", tmp_path], str(tmp_path / "node.pub"))


def test_enroll_needs_a_token_from_the_operator(capsys, tmp_path, pki, tls_address):
    base = ["client", "enroll", "--home", tmp_path, "--coordinator", tls_address, "--ca", pki.ca_cert]
    fails(capsys, base, "--token", "fedlora coordinator invite")
    fails(capsys, [*base, "--token-file", tmp_path / "none.token"], str(tmp_path / "none.token"))
    fails(capsys, [*base, "--token", "t", "--token-file", tmp_path / "t"], "contradict")

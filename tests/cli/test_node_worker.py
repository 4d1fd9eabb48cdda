"""``client start``'s worker supervisor: a worker killed mid-round fails that round, the next one works."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

import client.app as client_app
from cli.flower import flower_env
from cli.node_worker import WorkerSupervisor, worker_socket
from client import channel
from server.local_grid import task_identity
from tests.client.test_worker import PARTITION, context, run_config, train_message


@pytest.fixture(autouse=True)
def _identity():
    task_identity()


def _wait(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_worker_killed_mid_round_fails_that_round_and_is_restarted_for_the_next(tmp_path):
    gave_up = []
    supervisor = WorkerSupervisor(socket=worker_socket(tmp_path), env=flower_env(tmp_path / "flwr"),
                                  on_give_up=gave_up.append)
    supervisor.start()
    try:
        supervisor.wait_ready()
        rc = {**run_config(), "local-steps": 400}  # long enough to be killed in the middle
        node = {**PARTITION, client_app.WORKER_KEY: str(supervisor.socket)}
        replies = []
        worker = threading.Thread(target=lambda: replies.append(
            client_app.handle("train", train_message(rc), context(rc, node))))
        first = supervisor.process
        worker.start()
        time.sleep(3.0)  # the worker is loading the model or training
        os.kill(first.pid, signal.SIGKILL)
        worker.join(timeout=120)
        (reply,) = replies
        assert reply.content["status"]["status"] == "failed"
        assert "node worker" in reply.content["status"]["reason"]
        _wait(lambda: supervisor.restarts == 1 and supervisor.process is not first)
        supervisor.wait_ready()
        rc = run_config()
        again = client_app.handle("train", train_message(rc), context(rc, node))
        assert again.content["status"]["status"] == "ok"
        assert again.content["metrics"]["process-id"] == supervisor.process.pid
    finally:
        supervisor.stop()
    assert supervisor.process.poll() is not None and supervisor.restarts == 1 and not gave_up


def test_a_worker_that_cannot_start_is_given_up_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr("cli.node_worker.QUICK_EXITS_ALLOWED", 1)
    monkeypatch.setattr("cli.node_worker.RESTART_BACKOFF", 0.0)
    gave_up = []
    supervisor = WorkerSupervisor(socket=worker_socket(tmp_path), env={**flower_env(tmp_path), "PYTHONPATH": "/x"},
                                  on_give_up=gave_up.append)
    monkeypatch.setattr(supervisor, "_spawn", _spawn_failing(supervisor))
    supervisor.start()
    _wait(lambda: gave_up, timeout=30)
    with pytest.raises(RuntimeError, match="times in a row"):
        supervisor.wait_ready(timeout=5)
    supervisor.stop()


def _spawn_failing(supervisor: WorkerSupervisor):
    import subprocess

    def spawn() -> None:
        supervisor._started_at = time.monotonic()
        supervisor.process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(7)"])

    return spawn


def test_a_long_home_gets_a_private_short_socket(tmp_path):
    socket = worker_socket(tmp_path / ("x" * 120))
    assert len(str(socket)) <= channel.SOCKET_PATH_MAX
    assert oct(os.stat(socket.parent).st_mode & 0o777) == "0o700"

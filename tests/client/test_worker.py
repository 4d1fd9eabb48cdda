"""The resident node worker against the in-process handlers: same replies, one model load.

A real ``python -m client.worker`` process on a Unix socket, the real thin ClientApp
(``client.app.handle``) talking to it, the tiny model.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

import aggregation
import client.app as client_app
from aggregation import ModelSpec
from client import channel, handlers
from core.config import RunConfig
from core.model import module_shapes
from core.wire import record_to_tensors
from server.app import TRAIN_KEYS
from server.local_grid import FakeGrid, task_identity
from server.strategy import LoraStrategy
from tests.privacy.helpers import tiny

PARTITION = {"partition-id": 0, "num-partitions": 2}


@pytest.fixture(autouse=True)
def _identity():
    task_identity()


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    socket = tmp_path_factory.mktemp("w") / "s" / "worker.sock"
    proc = subprocess.Popen([sys.executable, "-m", "client.worker", "--socket", str(socket)])
    deadline = time.monotonic() + 120
    while not channel.ping(str(socket), timeout=1.0):
        assert proc.poll() is None and time.monotonic() < deadline, "the worker did not come up"
        time.sleep(0.2)
    yield socket, proc
    proc.terminate()
    assert proc.wait(timeout=30) == 0  # SIGTERM is a clean stop: the supervisor does not restart it


def run_config() -> dict:
    return RunConfig(model="tiny", num_server_rounds=2, ranks="4", max_rank=8, batch_size=2, local_steps=2,
                     max_seq_len=32, eval_examples=4, aggregator="flora").to_flower()


def train_message(rc: dict, server_round: int = 1) -> Message:
    cfg = RunConfig.from_flower(rc)
    grid = FakeGrid({1: 4})
    strategy = LoraStrategy(
        aggregator=aggregation.create(cfg.aggregator),
        spec=ModelSpec(modules=module_shapes(tiny().model, cfg.targets), max_rank=cfg.max_rank),
        train_config={k: rc[k] for k in TRAIN_KEYS}, clients_per_round=1, min_clients=1,
    )
    (msg,) = strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
    return msg


def context(rc: dict, node: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=rc)


def test_the_thin_clientapp_imports_no_torch():
    code = "import client.app, sys; assert not {'torch', 'transformers', 'peft'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_socket_is_reachable_only_by_the_nodes_user(worker):
    socket, _ = worker
    assert stat.S_IMODE(os.stat(socket).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(socket.parent).st_mode) == 0o700


def test_a_round_through_the_worker_equals_the_round_in_process(worker):
    socket, _ = worker
    rc, msg = run_config(), train_message(run_config())
    local = context(rc, PARTITION)
    remote = context(rc, {**PARTITION, client_app.WORKER_KEY: str(socket)})
    here = client_app.handle("train", msg, local)
    there = client_app.handle("train", msg, remote)
    assert there.content["status"]["status"] == "ok"
    assert there.metadata.reply_to_message_id == msg.metadata.message_id
    ours, theirs = record_to_tensors(here.content["update"]), record_to_tensors(there.content["update"])
    assert ours.keys() == theirs.keys() and ours
    for module in ours:
        for factor in ours[module]:
            np.testing.assert_array_equal(ours[module][factor], theirs[module][factor])
    # the node's state (base updates held) comes back into Flower's context
    assert set(remote.state.keys()) == set(local.state.keys())


def test_the_worker_loads_the_base_model_once_for_a_query_and_every_round(worker):
    socket, _ = worker
    rc = {**run_config(), "seed": 7}  # the worker caches by model name, not by run
    node = {**PARTITION, client_app.WORKER_KEY: str(socket)}
    query = Message(RecordDict({"config": ConfigRecord({"max-rank": 8})}), dst_node_id=1, message_type="query")
    answer = client_app.handle("query", query, context(rc, node))
    assert answer.content["info"]["rank"] == 4
    loads = [client_app.handle("train", train_message(rc, r), context(rc, node)).content["metrics"]["base-loads"]
             for r in (1, 2)]
    assert loads == [1, 1]  # one load in the worker's whole life, whichever test ran first
    assert handlers.BASE_LOADS["count"] <= 1  # and none here


def test_an_unreachable_worker_fails_the_round_with_the_reason(tmp_path, monkeypatch):
    rc = run_config()
    node = {**PARTITION, client_app.WORKER_KEY: str(tmp_path / "nobody.sock")}
    monkeypatch.setattr(client_app.channel, "call", _impatient(channel.call))
    reply = client_app.handle("train", train_message(rc), context(rc, node))
    assert reply.content["status"]["status"] == "failed"
    assert "nobody.sock" in reply.content["status"]["reason"]


def _impatient(call):
    return lambda *a, **kw: call(*a, **{**kw, "connect_timeout": 0.5})


def test_a_worker_that_speaks_another_version_is_refused_by_name():
    with pytest.raises(ValueError, match="upgrade fedlora on the node"):
        channel.decode_answer(channel.frame([b"fedlora-worker/0", b"ok", b"", b""]))

"""What the warm-node benchmark counts as training, and how it counts base-model loads."""

from types import SimpleNamespace

from simulations.bench_warm import base_loads, critical_training


def _client(node, seconds, pid, loads=1, status="ok"):
    return SimpleNamespace(node_id=node, seconds=seconds, status=status,
                           metrics={"process-id": pid, "base-loads": loads})


def test_two_clients_on_one_actor_are_both_training_time():
    # actor 1 trained two clients one after the other; actor 2 one, longer than either
    clients = [_client("a", 3.0, pid=1), _client("b", 2.0, pid=1), _client("c", 4.0, pid=2)]
    assert critical_training(clients) == 5.0


def test_clients_that_did_not_train_add_nothing():
    assert critical_training([_client("a", 9.0, pid=1, status="failed"), _client("b", 1.0, pid=2)]) == 1.0


def test_loads_per_node_sum_over_the_processes_that_trained_it():
    worker = [_client("a", 1.0, pid=7, loads=1), _client("a", 1.0, pid=7, loads=1)]  # one resident worker
    cold = [_client("b", 1.0, pid=8), _client("b", 1.0, pid=9)]  # a fresh process per message
    assert base_loads(worker + cold) == {"a": 1, "b": 2}

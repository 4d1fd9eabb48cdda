"""ClientApp: thin. Hands each message to the node's resident worker, or trains in-process.

Flower 1.41 starts one ClientApp process per message (``flwr/supernode/runtime/
run_clientapp.py`` pulls one task and exits), so anything this module imports or
loads is paid again every round. It therefore imports no torch, transformers or PEFT:

* with ``worker-socket`` in the node config (``fedlora client start`` sets it), the
  message and the node's context go to the worker (``client.worker``), which keeps the
  base model, tokenizer and data loaded across rounds and runs; its reply and the
  node's new context state come back. A worker that is down or dies mid-round makes
  this round's reply ``failed`` with the reason (a DP node's reply still carries the ε
  its ledger holds); ``client start`` restarts the worker for the next round.
* without it (simulation, where Ray's actors persist anyway; a SuperNode started by
  hand) the same handlers (``client.handlers``) run in this process, as before.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common import log
from logging import ERROR

from client import channel
from client.messages import status_reply

app = ClientApp()

WORKER_KEY = "worker-socket"  # node_config key: the worker's Unix socket


@app.query()
def query(msg: Message, context: Context) -> Message:
    return handle("query", msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle("train", msg, context)


@app.query("lora_sb")  # message type "query.lora_sb": Fed-SB's federated LoRA-SB init (client.lora_sb)
def lora_sb(msg: Message, context: Context) -> Message:
    return handle("lora_sb", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return handle("evaluate", msg, context)


def handle(action: str, msg: Message, context: Context) -> Message:
    socket = context.node_config.get(WORKER_KEY)
    if not socket:
        return in_process(action)(msg, context)
    try:
        answer = channel.call(str(socket), action, msg, context)
    except channel.WorkerUnavailable as exc:
        log(ERROR, "%s", exc)
        if action not in ("train", "evaluate"):
            raise  # Flower's error reply: the server refuses the node this round and asks again
        metrics = _ledger_metrics(context) if action == "train" else {}
        return status_reply(msg, status="failed", reason=str(exc), metrics=metrics)
    context.state = answer.state  # what Flower persists for the node's next message
    return Message(answer.content, reply_to=msg)


def in_process(action: str) -> Callable[[Message, Context], Message]:
    from client import handlers  # torch, transformers, PEFT: only when this process trains

    return handlers.HANDLERS[action]


def _ledger_metrics(context: Context) -> dict:
    """A DP node's ε after a lost round (the worker may have reserved it before dying)."""
    from client import handlers

    return handlers.ledger_metrics(context)

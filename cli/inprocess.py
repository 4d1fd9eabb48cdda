"""``fedlora simulate --engine inprocess``: the real ServerApp and ClientApp in this process.

``server.app.main`` runs against a grid whose nodes are ``client.app.app`` (what Flower
loads as ``client.app:app``), each with its own persistent ``Context`` and
``partition-id`` as Flower's simulation engine gives them. Every message crosses a real
wire copy (Flower's protobuf serde, both ways), so neither side can share an object with
the other, and a ClientApp that raises becomes Flower's ``Error`` reply, as the engines
send it. What this leaves out is the engines themselves: no SuperLink, no Ray, no
processes; nodes train one after another. What it keeps is everything fedlora wrote,
with one model load for the whole process (the ClientApp's model cache hits): the
engine for quality benchmarks and sweeps on a small machine, where Flower's engine
costs more than the training (``simulations.bench_quality``). Deployment and
``--engine flower`` stay the path for timing, isolation and real concurrency.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid


def _wire(msg: Message) -> Message:
    return message_from_proto(message_to_proto(msg))


class InProcessGrid(Grid):
    """Delivers each pushed message to its node's ClientApp at once; ``pull`` hands back the replies."""

    def __init__(self, *, contexts: dict[int, Context]) -> None:
        from client.app import app  # what Flower loads as ``client.app:app``

        self.app = app
        self.contexts = contexts
        self.replies: dict[str, Message] = {}
        self.delivered: list[Message] = []  # every message a node received, in order
        self.stopping = threading.Event()  # set by Ctrl-C in the main thread: no message is delivered after it

    # --- the parts of Flower's Grid a ServerApp uses ---------------------------------------

    def set_run(self, run) -> None:  # type: ignore[override]
        self._run = run

    @property
    def run(self):  # type: ignore[override]
        return getattr(self, "_run", None)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def get_nodes(self):  # type: ignore[override]
        return []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            if self.stopping.is_set():  # the ServerApp records it as interrupted, as for SIGINT
                raise KeyboardInterrupt("the in-process run was stopped")
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids do on push
            ids.append(msg.metadata.message_id)
            self.replies[msg.metadata.message_id] = self._deliver(_wire(msg))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [_wire(self.replies.pop(i)) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        self.delivered.append(msg)
        try:
            reply = self.app(msg, self.contexts[node])
        except Exception as exc:  # what the engines answer for a ClientApp that raised
            reply = Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
        reply.metadata._src_node_id = node  # what the engine sets on delivery
        return reply


def node_contexts(run_config: dict[str, Any], num_nodes: int, node_configs: dict[int, dict] | None = None
                  ) -> dict[int, Context]:
    """One persistent context per simulated node, ids 1..n, partition ids 0..n-1."""
    node_configs = node_configs or {}
    return {n: Context(run_id=1, node_id=n, state=RecordDict(), run_config=dict(run_config),
                       node_config={"partition-id": n - 1, "num-partitions": num_nodes, **node_configs.get(n, {})})
            for n in range(1, num_nodes + 1)}


def run_app(run_config: dict[str, Any], num_nodes: int, node_configs: dict[int, dict] | None = None, *,
            grid: InProcessGrid | None = None) -> InProcessGrid:
    """``server.app.main`` over ``num_nodes`` in-process nodes, to its end; the grid, for inspection."""
    from server.app import main
    from server.local_grid import task_identity  # Flower builds messages only inside a task

    task_identity()
    grid = grid or InProcessGrid(contexts=node_contexts(run_config, num_nodes, node_configs))
    main(grid, Context(run_id=1, node_id=0, state=RecordDict(), run_config=dict(run_config), node_config={}))
    return grid


class AppThread:
    """``run_app`` on a thread, with the one method of ``Popen`` that ``cli.progress.follow`` uses.

    The ServerApp records a failure in the database before it raises, so the run's row is
    the truth; the exception is kept (``error``) for the closing lines.
    """

    def __init__(self, run_config: dict[str, Any], num_nodes: int, *, log_path: Path) -> None:
        self.error: BaseException | None = None
        self.log_path = log_path
        self.grid = InProcessGrid(contexts=node_contexts(run_config, num_nodes))
        self._thread = threading.Thread(target=self._run, args=(run_config, num_nodes), daemon=True,
                                        name="fedlora-inprocess")

    def _run(self, run_config: dict[str, Any], num_nodes: int) -> None:
        # Flower's and fedlora's log lines go to the run's log file, as with the engine
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.log_path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(message)s"))
        flwr_logger = logging.getLogger("flwr")
        console_handlers = list(flwr_logger.handlers)  # the progress table is the console's, as with the engine
        for h in console_handlers:
            flwr_logger.removeHandler(h)
        flwr_logger.addHandler(handler)
        try:
            run_app(run_config, num_nodes, grid=self.grid)
        except BaseException as exc:  # noqa: BLE001 - kept for the caller, who reads the run's row
            self.error = exc
            flwr_logger.exception("fedlora in-process run failed")
        finally:
            flwr_logger.removeHandler(handler)
            handler.close()
            for h in console_handlers:
                flwr_logger.addHandler(h)

    def start(self) -> AppThread:
        self._thread.start()
        return self

    def stop(self, timeout: float = 120.0) -> None:
        """No more messages; wait for the node training now (up to ``timeout``) and the run's record."""
        self.grid.stopping.set()
        self._thread.join(timeout)

    def poll(self) -> int | None:
        if self._thread.is_alive():
            return None
        return 1 if self.error is not None else 0

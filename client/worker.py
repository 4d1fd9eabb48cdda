"""The node's resident worker: owns the device, keeps the model loaded, trains on request.

``fedlora client start`` runs it beside ``flower-supernode`` (and restarts it if it
dies); the per-message ClientApp (``client.app``) forwards every message here over a
Unix socket (``client.channel``). Because this process lives for the node's whole
life, ``client.handlers``' caches (base model and tokenizer per model name, examples
per data file) load once and serve every round of every run on the same model, and on
a GPU node the weights stay on the device.

Messages are handled one at a time: a node trains one round at a time on its device,
and a second run's message waits its turn rather than racing for GPU memory. After a
rank query (the first message of a run) the worker loads that run's base model while
the coordinator is still busy, so round 1 does not pay for it.

    python -m client.worker --socket PATH
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
from concurrent import futures
from pathlib import Path

import grpc

from client import channel, handlers
from privacy.settings import parse_run_config

READY_LINE = "fedlora node worker ready on"


class Worker:
    """The handlers behind one lock; ``handle`` is the gRPC method's body."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.handled = 0

    def handle(self, request: bytes, _context: grpc.ServicerContext) -> bytes:
        try:
            action, msg, ctx = channel.decode_request(request)
            handler = handlers.HANDLERS[action]
        except (ValueError, KeyError) as exc:
            return channel.encode_error(f"bad request: {exc}")
        try:
            with self._lock:
                reply = handler(msg, ctx)
                self.handled += 1
        except Exception:  # the ClientApp raises it again, so Flower replies with the error
            return channel.encode_error(traceback.format_exc())
        if action == "query":
            threading.Thread(target=self._preload, args=(dict(ctx.run_config),), daemon=True).start()
        return channel.encode_answer(reply.content, ctx.state)

    def _preload(self, run_config: dict) -> None:
        try:
            model = parse_run_config(run_config).model
            with self._lock:
                handlers.cached_base(model)
        except Exception:  # the round will load it and report any error itself
            traceback.print_exc()


def serve(socket: Path) -> grpc.Server:
    """Start serving on ``socket`` (its directory made 0700, the socket 0600)."""
    if len(str(socket)) > channel.SOCKET_PATH_MAX:
        raise ValueError(f"worker socket path {str(socket)!r} is longer than {channel.SOCKET_PATH_MAX} bytes "
                         "(a Unix socket limit): choose a shorter --home")
    socket.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(socket.parent, 0o700)
    socket.unlink(missing_ok=True)  # a previous worker's, left by a crash
    worker = Worker()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=channel.OPTIONS)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("fedlora.NodeWorker", {
        "Handle": grpc.unary_unary_rpc_method_handler(worker.handle),
        "Ping": grpc.unary_unary_rpc_method_handler(lambda request, _ctx: channel.VERSION),
    })])
    old_umask = os.umask(0o177)  # the socket is created 0600, never briefly wider
    try:
        server.add_insecure_port(f"unix:{socket}")
        server.start()
    finally:
        os.umask(old_umask)
    os.chmod(socket, 0o600)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--socket", required=True, help="Unix socket to serve on")
    args = parser.parse_args(argv)
    socket = Path(args.socket).expanduser().resolve()
    server = serve(socket)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"{READY_LINE} {socket} (pid {os.getpid()})", flush=True)
    stop.wait()
    server.stop(grace=5).wait()
    socket.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

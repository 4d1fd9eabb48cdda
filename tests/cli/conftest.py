"""Shared fixtures for the deployment tests: a throw-away PKI and a local TLS server."""

from __future__ import annotations

import contextlib
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cli.certs import TlsFiles, generate_tls


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args) -> None:
        pass


@contextlib.contextmanager
def tls_server(files: TlsFiles) -> Iterator[str]:
    """A local HTTPS server with ``/health``, presenting ``files``' server certificate."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(files.server_cert), str(files.server_key))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> TlsFiles:
    return generate_tls(tmp_path_factory.mktemp("pki"), hostnames=["coordinator.example"])


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> Path:
    return generate_tls(tmp_path_factory.mktemp("other"), hostnames=["coordinator.example"]).ca_cert


@pytest.fixture(scope="module")
def tls_address(pki) -> Iterator[str]:
    with tls_server(pki) as address:
        yield address

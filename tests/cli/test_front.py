"""The public front (cli/front.py) against a fake SuperLink, both real uvicorn servers over TLS.

The fake upstream records every request it receives, so a refusal is checked on both ends:
the caller gets 403 with a reason, and the SuperLink never saw the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import ssl
import threading
import time
from base64 import b64decode
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import uvicorn

from cli.certs import TlsFiles, generate_node_keys
from cli.enrollment import ENROLL_PATH, Enroller, TokenStore
from cli.node_registry import EnrolledNode, KeyInUse
from cli.front import FrontApp, FrontServer, forwarded
from cli.local_superlink import free_port

MiB = 2**20


@dataclass
class Upstream:
    """A stand-in SuperLink: echoes, streams, fails on request; records what reached it."""

    seen: list[tuple[str, str, dict[str, str], int]] = field(default_factory=list)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            message = await receive()
            body.extend(message.get("body", b""))
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.seen.append((scope["method"], scope["path"], headers, len(body)))
        path = scope["path"]
        if path == "/v1/fleet/stream":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"x/y")]})
            for i in range(3):
                await send({"type": "http.response.body", "body": f"part{i};".encode(), "more_body": True})
                await asyncio.sleep(0.5)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        status = {"/v1/fleet/unauthorized": 401, "/v1/fleet/precondition": 412}.get(path, 200)
        reply = bytes(body) if path == "/v1/fleet/echo" else b'{"detail": "from upstream"}'
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/x-protobuf"), (b"content-length", str(len(reply)).encode()),
            (b"x-flwr-test", b"kept"), (b"x-flwr-test", b"twice"),
            (b"x-body-sha256", hashlib.sha256(body).hexdigest().encode())]})
        await send({"type": "http.response.body", "body": reply, "more_body": False})


@contextlib.contextmanager
def serving(app, tls: TlsFiles) -> Iterator[int]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, ssl_certfile=str(tls.server_cert),
                                           ssl_keyfile=str(tls.server_key), log_config=None, lifespan="off",
                                           ws="none"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "upstream did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class FakeRegistry:
    def __init__(self) -> None:
        self.registered: list[tuple[str, bytes]] = []

    def register(self, *, name: str, public_key: bytes) -> int:
        if any(key == public_key for _, key in self.registered):
            raise KeyInUse("the public key is already registered with the SuperLink")
        self.registered.append((name, public_key))
        return 2**64 - len(self.registered)  # Flower's node IDs are uint64

    def nodes(self) -> list[EnrolledNode]:
        return []


@dataclass(frozen=True, kw_only=True)
class Front:
    url: str
    upstream: Upstream
    store: TokenStore
    registry: FakeRegistry
    client: httpx.Client
    ca: object


@pytest.fixture(scope="module")
def front(pki, tmp_path_factory) -> Iterator[Front]:
    upstream, registry = Upstream(), FakeRegistry()
    store = TokenStore.in_home(tmp_path_factory.mktemp("coordinator"))
    with serving(upstream, pki) as upstream_port:
        app = FrontApp(upstream=f"https://127.0.0.1:{upstream_port}", ca=pki.ca_cert,
                       enroller=Enroller(store=store, registry=registry), operator_hint=" Operators: loopback.")
        failed = threading.Event()
        server = FrontServer(app=app, host="127.0.0.1", port=free_port(), tls=pki, on_failure=failed.set)
        server.start()
        server.wait_ready(timeout=20)
        url = f"https://127.0.0.1:{server.config.port}"
        with httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca_cert)), timeout=30) as client:
            yield Front(url=url, upstream=upstream, store=store, registry=registry, client=client,
                        ca=pki.ca_cert)
        server.stop()
        assert not failed.is_set()


@contextlib.contextmanager
def front_log(caplog) -> Iterator[list[str]]:
    """The front's log lines (its logger does not propagate: it writes to the coordinator's stdout)."""
    logger = logging.getLogger("fedlora.coordinator")
    logger.addHandler(caplog.handler)
    lines: list[str] = []
    try:
        with caplog.at_level(logging.INFO, logger="fedlora.coordinator"):
            yield lines
            lines.extend(r.getMessage() for r in caplog.records)
    finally:
        logger.removeHandler(caplog.handler)


# --- the allow-list ---------------------------------------------------------------------------


@pytest.mark.parametrize("method, path", [
    ("POST", "/v1/control/list-runs"), ("POST", "/v1/control/start-run"), ("POST", "/v1/control/register-node"),
    ("POST", "/v1/control/stop-run"), ("POST", "/v1/runtime/pull-messages"), ("GET", "/docs"),
    ("GET", "/openapi.json"), ("GET", "/v1/fleet/pull-messages"), ("POST", "/health"), ("POST", "/v1/fleet/"),
    ("POST", "/v1/fleet"), ("POST", "/V1/fleet/pull-messages"), ("POST", "/v1/fleet/pull-messages/x"),
])
def test_everything_but_fleet_and_health_is_refused_with_a_reason(front, caplog, method, path):
    before = len(front.upstream.seen)
    with front_log(caplog) as lines:
        response = front.client.request(method, front.url + path, content=b"\x00")
    assert response.status_code == 403, response.text
    assert any(f"refused {method} '{path}' from 127.0.0.1:" in line for line in lines), lines
    assert "only the Fleet API" in response.json()["detail"] and "Operators: loopback." in response.json()["detail"]
    assert len(front.upstream.seen) == before  # the SuperLink never saw it


@pytest.mark.parametrize("raw_path", [
    b"/v1/fleet/../control/list-runs", b"/v1/fleet/%2e%2e/control/list-runs", b"/v1/fleet/%2E%2E%2Fcontrol",
    b"/v1/fleet//control/list-runs", b"/v1/fleet/./pull-messages", b"/v1/fleet/pull-messages%00",
])
def test_path_tricks_never_reach_the_control_api(front, raw_path):
    # sent byte for byte over a socket: httpx itself would normalise some of these away
    host, port = front.url.removeprefix("https://").split(":")
    context = ssl.create_default_context(cafile=str(front.ca))
    before = len(front.upstream.seen)
    with context.wrap_socket(socket.create_connection((host, int(port)), timeout=10), server_hostname=host) as sock:
        sock.sendall(b"POST " + raw_path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        head = sock.recv(200).decode("latin-1")
    assert head.startswith("HTTP/1.1 403"), head
    assert len(front.upstream.seen) == before


def test_forwarding_rule_is_exact():
    assert forwarded("POST", "/v1/fleet/push-object", b"/v1/fleet/push-object")
    assert forwarded("GET", "/health", b"/health") and forwarded("HEAD", "/health", b"/health")
    assert not forwarded("POST", "/v1/fleet/../control/x", b"/v1/fleet/%2e%2e/control/x")
    assert not forwarded("POST", "/v1/fleet/push_object", None)
    assert not forwarded("PUT", "/v1/fleet/push-object", b"/v1/fleet/push-object")


# --- faithful forwarding ------------------------------------------------------------------------


def test_large_bodies_cross_byte_exact_both_ways(front):
    body = os.urandom(12 * MiB + 12345)  # Flower chunks arrays at 5 MiB; a message holds several
    response = front.client.post(front.url + "/v1/fleet/echo", content=body,
                                 headers={"content-type": "application/x-protobuf"})
    assert response.status_code == 200
    assert response.content == body
    assert response.headers["x-body-sha256"] == hashlib.sha256(body).hexdigest()
    assert response.headers["content-length"] == str(len(body))
    assert front.upstream.seen[-1][3] == len(body)


def test_flower_headers_reach_the_superlink_unchanged_and_signatures_verify(front, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key, verify_signature
    from flwr.supercore.protobuf.client import ProtobufRequestContext
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    key = serialization.load_ssh_private_key(generate_node_keys(tmp_path).private.read_bytes(), password=None)
    request = httpx.Request("POST", front.url + "/v1/fleet/echo", content=b"pb",
                            headers={"content-type": "application/x-protobuf", "x-flwr-package-version": "1.41.0"})
    # Flower's own SuperNode interceptor signs the request, exactly as flower-supernode does
    context = ProtobufRequestContext(rpc_method="/flwr.proto.Fleet/PullMessages", message=None, request=request)
    response = NodeAuthHttpInterceptor(key, key.public_key()).intercept(
        context, lambda ctx: front.client.send(ctx.request))
    assert response.status_code == 200
    _, path, seen, _ = front.upstream.seen[-1]
    assert path == "/v1/fleet/echo"
    signed = {k.lower(): v for k, v in request.headers.items()}
    for name in ("flwr-public-key", "flwr-signature", "flwr-timestamp", "x-flwr-package-version", "content-type"):
        assert name in signed and seen[name] == signed[name], name
    public = bytes_to_public_key(b64decode(seen["flwr-public-key"]))
    assert verify_signature(public, seen["flwr-timestamp"].encode("ascii"), b64decode(seen["flwr-signature"]))


@pytest.mark.parametrize("path, status", [("/v1/fleet/unauthorized", 401), ("/v1/fleet/precondition", 412),
                                          ("/v1/fleet/anything", 200)])
def test_status_codes_and_response_headers_pass_through(front, path, status):
    response = front.client.post(front.url + path, content=b"")
    assert response.status_code == status
    assert response.json() == {"detail": "from upstream"}
    assert response.headers.get_list("x-flwr-test") == ["kept", "twice"]


def test_streamed_responses_are_relayed_as_they_come(front):
    started = time.monotonic()
    with front.client.stream("POST", front.url + "/v1/fleet/stream", content=b"") as response:
        chunks = [(time.monotonic() - started, chunk) for chunk in response.iter_raw()]
    assert b"".join(c for _, c in chunks) == b"part0;part1;part2;"
    assert chunks[0][0] < 0.9 < chunks[-1][0]  # the first part arrived before the upstream finished


def test_health_is_forwarded_for_get_and_head(front):
    assert front.client.get(front.url + "/health").status_code == 200
    assert front.client.head(front.url + "/health").status_code == 200
    assert front.upstream.seen[-1][:2] == ("HEAD", "/health")


def test_upstream_down_is_a_502_with_a_reason():
    async def scenario() -> httpx.Response:
        app = FrontApp(upstream=f"https://127.0.0.1:{free_port()}", ca=None, enroller=None)
        async with httpx.AsyncClient(verify=False) as app.client, httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://front") as caller:
            return await caller.post("/v1/fleet/pull-messages", content=b"")

    response = asyncio.run(scenario())
    assert response.status_code == 502 and "did not answer" in response.json()["detail"]


# --- enrollment through the front ----------------------------------------------------------------


def _enroll(front: Front, token: str, public_key: str) -> httpx.Response:
    return front.client.post(front.url + ENROLL_PATH, json={"token": token, "public-key": public_key})


def test_a_token_enrolls_once_then_is_refused_and_logged(front, tmp_path, caplog):
    token = front.store.issue(name="hospital-a", valid_for=3600)
    first = generate_node_keys(tmp_path / "a").public.read_text()
    with front_log(caplog) as lines:
        ok = _enroll(front, token, first)
        again = _enroll(front, token, generate_node_keys(tmp_path / "b").public.read_text())
    assert ok.status_code == 200 and ok.json()["name"] == "hospital-a", ok.text
    assert int(ok.json()["node-id"]) > 2**63  # a uint64 survives the store and the reply
    assert front.registry.registered[-1] == ("hospital-a", first.encode())
    assert again.status_code == 403 and "already used" in again.json()["detail"]
    assert len([n for n, _ in front.registry.registered if n == "hospital-a"]) == 1
    assert any("already used" in line and "127.0.0.1" in line for line in lines), lines
    assert any("enrolled node 'hospital-a'" in line for line in lines), lines


def test_forged_and_expired_tokens_are_refused(front, tmp_path):
    key = generate_node_keys(tmp_path).public.read_text()
    forged = _enroll(front, "not-a-token-anyone-issued", key)
    assert forged.status_code == 403 and "unknown enrollment token" in forged.json()["detail"]
    expired = front.store.issue(name="late", valid_for=60, now=time.time() - 120)
    response = _enroll(front, expired, key)
    assert response.status_code == 403 and "expired" in response.json()["detail"]
    assert all(name != "late" for name, _ in front.registry.registered)


def test_a_malformed_key_does_not_spend_the_token(front, tmp_path):
    token = front.store.issue(name="careful", valid_for=3600)
    bad = _enroll(front, token, "ssh-ed25519 AAAA nope")
    assert bad.status_code == 400 and bad.json()["error"] == "bad-request"
    good = _enroll(front, token, generate_node_keys(tmp_path).public.read_text())
    assert good.status_code == 200, good.text


def test_an_already_registered_key_is_a_409_and_leaves_the_token_usable(front, tmp_path):
    key = generate_node_keys(tmp_path).public.read_text()
    assert _enroll(front, front.store.issue(name="n-1", valid_for=3600), key).status_code == 200
    token = front.store.issue(name="n-2", valid_for=3600)
    response = _enroll(front, token, key)
    assert response.status_code == 409 and response.json()["error"] == "key-enrolled"
    assert _enroll(front, token, generate_node_keys(tmp_path / "other").public.read_text()).status_code == 200


@pytest.mark.parametrize("body", [b"{", b"[]", b'{"token": 1, "public-key": "x"}', b'{"token": "x"}',
                                  b"x" * 20000])
def test_malformed_enrollment_requests_are_400(front, body):
    response = front.client.post(front.url + ENROLL_PATH, content=body)
    assert response.status_code == 400 and "malformed" in response.json()["detail"]


def test_enrollment_requests_are_never_forwarded(front):
    before = len(front.upstream.seen)
    front.client.post(front.url + ENROLL_PATH, json={"token": "x", "public-key": "y"})
    assert len(front.upstream.seen) == before

"""The coordinator's public port: Flower's Fleet API for SuperNodes, and enrollment; nothing else.

Flower 1.41's SuperLink serves its Fleet, Control and Runtime APIs on one port, and the
open-source Control API authenticates nobody: whoever reaches it can list, start and stop
runs (a run ships code that every node executes) and register SuperNodes. So the SuperLink
listens on 127.0.0.1 only, and this front, on the public address, answers:

  POST /v1/fleet/<call>     forwarded to the SuperLink: body bytes streamed both ways,
                            headers (the SuperNode's signature and version headers
                            included) and status codes unchanged
  GET|HEAD /health          forwarded likewise (healthchecks, ``fedlora ... --ca`` probes)
  POST /fedlora/v1/enroll   a one-time token redeemed for a key (cli/enrollment.py)
  anything else             403 with a one-line JSON reason, logged with the peer's address

Paths must match Flower's route shape exactly (one lower-case segment after /v1/fleet/):
dot segments, percent-escapes and doubled slashes are refused, because the HTTP client
would normalise ``/v1/fleet/../control/start-run`` into a Control call. HTTP/1.1 on both
sides, as Flower's SuperNode (httpx) speaks it; uvicorn serves, httpx forwards.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from cli.certs import TlsFiles
from cli.enrollment import ENROLL_PATH, Enroller, EnrollmentRefused, log

FLEET_CALL = re.compile(r"/v1/fleet/[a-z0-9-]+")
HEALTH = "/health"
# Per-connection headers (RFC 9110 7.6.1) and Host: each hop sets its own.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
                        b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade", b"host"})
MAX_ENROLL_BODY = 16 * 1024
# Bounded, yet far above any Fleet call; the upstream keeps idle connections 5 s (uvicorn's
# default), so the pool drops them first instead of racing a server-side close.
UPSTREAM_TIMEOUT = httpx.Timeout(connect=10.0, read=300.0, write=300.0, pool=None)
UPSTREAM_KEEPALIVE_S = 4.0
Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]


class FrontApp:
    """The ASGI app: allow-list, forwarder, enrollment endpoint."""

    def __init__(self, *, upstream: str, ca: Path | None, enroller: Enroller | None,
                 operator_hint: str = "") -> None:
        self.upstream = httpx.URL(upstream)
        self.ca = ca
        self.enroller = enroller
        self.operator_hint = operator_hint  # appended to refusals: where operators go instead
        self.client: httpx.AsyncClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        # websockets: not answered; uvicorn closes them

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                verify = ssl.create_default_context(cafile=str(self.ca)) if self.ca else False
                self.client = httpx.AsyncClient(
                    verify=verify, timeout=UPSTREAM_TIMEOUT, follow_redirects=False,
                    limits=httpx.Limits(max_connections=None, max_keepalive_connections=64,
                                        keepalive_expiry=UPSTREAM_KEEPALIVE_S))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        if method == "POST" and path == ENROLL_PATH and self.enroller is not None:
            await self._enroll(Request(scope, receive), send)
        elif forwarded(method, path, scope.get("raw_path")):
            await self._forward(scope, Request(scope, receive), send)
        else:
            log.warning("refused %s %s from %s", method, _shown(scope), _peer(scope))
            await _json(send, 403, {"detail": f"fedlora coordinator: {method} {path[:200]} is not served on this "
                                              "port, which carries only the Fleet API (SuperNodes) and "
                                              f"enrollment.{self.operator_hint}"})

    async def _forward(self, scope: Scope, request: Request, send: Send) -> None:
        assert self.client is not None, "lifespan startup creates the client"
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        body = request.stream() if scope["method"] == "POST" else None
        url = self.upstream.copy_with(path=scope["path"], query=scope.get("query_string") or None)
        # A bare Request, not client.build_request: that would add httpx's own default headers.
        outgoing = httpx.Request(scope["method"], url, headers=headers, content=body,
                                 extensions={"timeout": UPSTREAM_TIMEOUT.as_dict()})
        try:
            response = await self.client.send(outgoing, stream=True)
        except ClientDisconnect:
            return
        except httpx.HTTPError as exc:
            log.error("forwarding %s %s from %s failed: %s", scope["method"], scope["path"], _peer(scope),
                      exc or type(exc).__name__)
            await _json(send, 502, {"detail": "fedlora coordinator: the SuperLink behind this port did not answer"})
            return
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]})
            async for chunk in response.aiter_raw():  # raw: no decoding, bytes as the SuperLink sent them
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    async def _enroll(self, request: Request, send: Send) -> None:
        assert self.enroller is not None
        peer = _peer(request.scope)
        try:
            body = bytearray()
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > MAX_ENROLL_BODY:
                    raise ValueError(f"request body over {MAX_ENROLL_BODY} bytes")
            payload = json.loads(body)
            token, public_key, name = payload["token"], payload["public-key"], payload.get("name")
            if not all(isinstance(v, str) for v in (token, public_key)) or not isinstance(name, str | None):
                raise ValueError("'token', 'public-key' and 'name' must be strings")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("enrollment from %s refused: malformed request (%s)", peer, exc)
            await _json(send, 400, {"detail": f"malformed enrollment request: {exc}", "error": "bad-request"})
            return
        except ClientDisconnect:
            return
        try:
            node = await run_in_threadpool(self.enroller.enroll, token=token, public_key=public_key, peer=peer,
                                           name=name)
        except EnrollmentRefused as exc:
            await _json(send, exc.status, {"detail": exc.reason, "error": exc.error})
            return
        await _json(send, 200, {"name": node.name, "node-id": str(node.node_id)})


def forwarded(method: str, path: str, raw_path: bytes | None) -> bool:
    """Whether a request goes to the SuperLink: a Fleet call or the health check, spelled plainly."""
    if raw_path is not None and raw_path != path.encode("latin-1", "replace"):
        return False  # percent-escapes: refused rather than decoded twice
    return (method == "POST" and FLEET_CALL.fullmatch(path) is not None) or (
        method in ("GET", "HEAD") and path == HEALTH)


async def _json(send: Send, status: int, payload: dict[str, str]) -> None:
    body = json.dumps(payload).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "an unknown peer"


def _shown(scope: Scope) -> str:
    raw = scope.get("raw_path") or scope["path"].encode("utf-8", "replace")
    return repr(raw.decode("latin-1")[:200])


# --- serving ------------------------------------------------------------------------------------


class FrontServer:
    """uvicorn serving a ``FrontApp`` from a thread of the coordinator process.

    A thread, not a process: it lives and dies with ``fedlora coordinator start``, which
    stops it after the SuperLink; ``on_failure`` runs if it stops on its own.
    """

    def __init__(self, *, app: FrontApp, host: str, port: int, tls: TlsFiles | None,
                 on_failure: Callable[[], None]) -> None:
        self.config = uvicorn.Config(
            app, host=host, port=port, ssl_certfile=str(tls.server_cert) if tls else None,
            proxy_headers=False,  # the edge: X-Forwarded-For from a client must not rename the peer in logs
            ssl_keyfile=str(tls.server_key) if tls else None, lifespan="on", log_config=None, ws="none",
            access_log=False, server_header=False, date_header=False,  # the SuperLink's own pass through
            timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(self.config)
        self.on_failure = on_failure
        self.error: str | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="fedlora-front", daemon=True)

    def start(self) -> None:
        _log_to_stdout()
        self._thread.start()

    def _serve(self) -> None:
        try:
            self.server.run()
        except BaseException as exc:  # noqa: BLE001 - SystemExit included: uvicorn exits on bind errors
            self.error = f"{type(exc).__name__}: {exc}"
        if not self._stopping:  # stopped on its own: a bind, certificate or lifespan error
            self.error = self.error or "the front stopped"
            self.on_failure()

    def wait_ready(self, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the public front on {self.config.host}:{self.config.port} did not start: "
                                   f"{self.error or 'timed out'}")
            time.sleep(0.05)

    def stop(self) -> None:
        self._stopping = True
        self.server.should_exit = True
        self._thread.join(timeout=10)


def _log_to_stdout() -> None:
    # Refusals and enrollments go where the SuperLink's log goes (the coordinator's stdout).
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("fedlora coordinator: %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False

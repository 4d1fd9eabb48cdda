"""Who may join the federation: one-time enrollment tokens and their redemption.

  TokenStore    invitations in HOME/enrollment.db (SQLite): the SHA-256 of each token (never
                the token itself), the node name it admits, its expiry, when it was spent and
                the SuperNode it enrolled. ``redeem`` spends a token at most once, also when
                redemptions race: one conditional UPDATE decides.
  (the SuperLink's own node registry, which a redeemed key is registered in: cli/node_registry.py)
  Enroller      what the front does for ``POST /fedlora/v1/enroll``: the token first, only
                then the key; every outcome is logged with the peer's address.
  redeem_token  the node's side of that call (``fedlora client enroll --token``).

Tokens are 256-bit random strings, so a plain SHA-256 is enough at rest (nothing to
brute-force); lookups go by that hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import secrets
import sqlite3
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cli.certs import parse_node_public_key
from cli.node_registry import EnrolledNode, KeyInUse, KeyRevoked, NameInUse, NodeRegistry, RegistryError

ENROLL_PATH = "/fedlora/v1/enroll"
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DURATION = re.compile(r"(\d+)([smhd])")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
log = logging.getLogger("fedlora.coordinator")


def check_name(name: str) -> str:
    if not NODE_NAME.fullmatch(name):
        raise ValueError(f"node name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return name


def parse_duration(text: str) -> float:
    """'90s', '30m', '24h', '7d' -> seconds."""
    match = DURATION.fullmatch(text.strip())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"duration {text!r} is not a positive number followed by s, m, h or d (e.g. 24h)")
    return int(match.group(1)) * UNITS[match.group(2)]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """256 random bits, URL-safe; never starting with '-', which a command line reads as an option
    (``fedlora client enroll --token -x...`` failed with "expected one argument", 1 token in 64)."""
    while True:
        token = secrets.token_urlsafe(32)
        if not token.startswith("-"):
            return token


class TokenRefused(Exception):
    """A token that is unknown (forged, mistyped, revoked), spent or expired; the reason is safe to show."""


@dataclass(frozen=True, kw_only=True)
class Invitation:
    name: str
    expires_at: float
    spent_at: float | None
    node_id: int | None


class TokenStore:
    # node_id is TEXT: Flower's node IDs are uint64, beyond SQLite's INTEGER
    SCHEMA = ("CREATE TABLE IF NOT EXISTS invitations (token_sha256 TEXT PRIMARY KEY, name TEXT NOT NULL, "
              "created_at REAL NOT NULL, expires_at REAL NOT NULL, spent_at REAL, node_id TEXT)")

    def __init__(self, *, path: Path) -> None:
        self.path = path

    @classmethod
    def in_home(cls, home: Path) -> TokenStore:
        return cls(path=home / "enrollment.db")

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch(mode=0o600, exist_ok=True)  # hashes only, still nobody else's business
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute(self.SCHEMA)
            db.execute("BEGIN IMMEDIATE")  # one writer at a time, across processes too
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    def issue(self, *, name: str, valid_for: float, now: float | None = None) -> str:
        token = new_token()
        issued = time.time() if now is None else now
        with self._db() as db:
            db.execute("INSERT INTO invitations VALUES (?, ?, ?, ?, NULL, NULL)",
                       (token_hash(token), check_name(name), issued, issued + valid_for))
        return token

    def redeem(self, token: str, *, expect: str | None = None, now: float | None = None) -> str:
        """Spend ``token``; returns the node name it admits, or raises TokenRefused.

        ``expect``: the name the node asked for; another name refuses the token unspent.
        """
        at = time.time() if now is None else now
        with self._db() as db:
            row = db.execute("SELECT name, expires_at, spent_at FROM invitations WHERE token_sha256 = ?",
                             (token_hash(token),)).fetchone()
            if row is None:
                raise TokenRefused("unknown enrollment token (never issued, mistyped or revoked)")
            name, expires_at, spent_at = row
            if spent_at is not None:
                raise TokenRefused(f"the enrollment token for {name!r} was already used, at {_when(spent_at)}")
            if expires_at <= at:
                raise TokenRefused(f"the enrollment token for {name!r} expired at {_when(expires_at)}")
            if expect is not None and expect != name:
                raise TokenRefused(f"this enrollment token admits {name!r}, not {expect!r} (left unused)")
            spent = db.execute("UPDATE invitations SET spent_at = ? WHERE token_sha256 = ? AND spent_at IS NULL",
                               (at, token_hash(token)))
            if spent.rowcount != 1:  # unreachable under BEGIN IMMEDIATE; the guard costs nothing
                raise TokenRefused(f"the enrollment token for {name!r} was already used")
        return name

    def release(self, token: str) -> None:
        """Registration failed after ``redeem``: the token may be used again (until it expires)."""
        with self._db() as db:
            db.execute("UPDATE invitations SET spent_at = NULL WHERE token_sha256 = ? AND node_id IS NULL",
                       (token_hash(token),))

    def settle(self, token: str, *, node_id: int) -> None:
        with self._db() as db:
            db.execute("UPDATE invitations SET node_id = ? WHERE token_sha256 = ?", (str(node_id), token_hash(token)))

    def cancel(self, name: str) -> int:
        """Delete the unspent invitations for ``name``; returns how many there were."""
        with self._db() as db:
            return db.execute("DELETE FROM invitations WHERE name = ? AND spent_at IS NULL", (name,)).rowcount

    def pending(self, *, now: float | None = None) -> list[Invitation]:
        at = time.time() if now is None else now
        with self._db() as db:
            rows = db.execute("SELECT name, expires_at, spent_at, node_id FROM invitations "
                              "WHERE spent_at IS NULL AND expires_at > ? ORDER BY expires_at", (at,)).fetchall()
        return [Invitation(name=n, expires_at=e, spent_at=s, node_id=int(i) if i else None) for n, e, s, i in rows]


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


# --- redemption: the front's side and the node's side -------------------------------------------


class EnrollmentRefused(Exception):
    def __init__(self, *, status: int, reason: str, error: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.error = error  # for clients: bad-request, refused, key-enrolled, key-revoked, name-taken, unavailable


class Enroller:
    def __init__(self, *, store: TokenStore, registry: NodeRegistry) -> None:
        self.store = store
        self.registry = registry

    def enroll(self, *, token: str, public_key: str, peer: str, name: str | None = None) -> EnrolledNode:
        """Redeem ``token`` for ``public_key`` (``name``: what the node expects to be called)."""
        try:  # a malformed key must not spend the token
            parse_node_public_key(public_key.encode("utf-8"), source="the public key")
        except ValueError as exc:
            log.warning("enrollment from %s refused: %s", peer, exc)
            raise EnrollmentRefused(status=400, reason=str(exc), error="bad-request") from None
        try:
            name = self.store.redeem(token, expect=name)
        except TokenRefused as exc:
            log.warning("enrollment from %s refused: %s", peer, exc)
            raise EnrollmentRefused(status=403, reason=str(exc), error="refused") from None
        try:
            node_id = self.registry.register(name=name, public_key=public_key.encode("utf-8"))
        except RegistryError as exc:
            self.store.release(token)  # nothing was enrolled with it
            status, error = {KeyInUse: (409, "key-enrolled"), KeyRevoked: (409, "key-revoked"),
                             NameInUse: (409, "name-taken")}.get(type(exc), (502, "unavailable"))
            log.warning("enrollment of %r from %s failed (token not spent): %s", name, peer, exc)
            raise EnrollmentRefused(status=status, reason=str(exc), error=error) from None
        self.store.settle(token, node_id=node_id)
        log.info("enrolled node %r (SuperNode %d) from %s", name, node_id, peer)
        return EnrolledNode(node_id=node_id, name=name, status="registered")


def redeem_token(*, coordinator: str, ca: Path | None, token: str, public_key: str, name: str | None,
                 timeout: float = 60.0) -> dict[str, Any]:
    """POST the token and key to a coordinator's front; its JSON reply plus ``status``."""
    import httpx

    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca)) if ca else False
    url = f"{'https' if ca else 'http'}://{coordinator}{ENROLL_PATH}"
    try:
        request = {"token": token, "public-key": public_key, **({"name": name} if name else {})}
        response = httpx.post(url, json=request, verify=verify, timeout=timeout)
    except httpx.HTTPError as exc:
        reason = exc or type(exc).__name__
        raise ConnectionError(f"enrollment at coordinator {coordinator!r} failed: {reason}") from None
    try:
        reply = response.json()
    except ValueError:
        reply = {"detail": response.text[:300]}
    if not isinstance(reply, dict):
        reply = {"detail": str(reply)[:300]}
    return {**reply, "status": response.status_code}

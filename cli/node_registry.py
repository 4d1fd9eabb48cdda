"""The SuperLink's own node registry, through its Control API on loopback.

Flower's ``ControlHttpClient``: register a key under a name, list, unregister. Not the
``flwr supernode`` CLI: its JSON output drops the node names. Flower keeps a revoked
node's key taken for good (status ``unregistered``), so a revoked key cannot enroll again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cli.certs import parse_node_public_key

GONE = "unregistered"  # Flower's status of a revoked node (its key stays taken)


class RegistryError(RuntimeError):
    """The Control API refused a call or did not answer; the message says which and why."""


class KeyInUse(RegistryError):
    """The public key belongs to an enrolled node already."""


class KeyRevoked(RegistryError):
    """The public key belonged to a revoked node: Flower keeps it taken, so it can never enroll again."""


class NameInUse(RegistryError):
    """Another enrolled node already has this name (names identify nodes for ``revoke``)."""


@dataclass(frozen=True, kw_only=True)
class EnrolledNode:
    node_id: int
    name: str
    status: str  # Flower's: registered, online, offline (unregistered ones are not listed)
    public_key: bytes = b""  # as Flower stores it (PEM SubjectPublicKeyInfo)


class NodeRegistry:
    """The SuperLink's node registry, over its Control API at ``address`` (loopback)."""

    def __init__(self, *, address: str, ca: Path | None) -> None:
        self.address = address
        self.ca = ca

    @contextlib.contextmanager
    def _control(self, what: str) -> Iterator[Any]:
        import httpx  # Flower's own HTTP stack; imported here to keep CLI start-up fast
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.error import FlowerError
        from flwr.supercore.interceptors.http import RuntimeVersionHttpInterceptor

        client = ControlHttpClient.from_server_address(
            server_address=self.address, insecure=self.ca is None,
            root_certificates=self.ca.read_bytes() if self.ca else None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")])
        try:
            yield client
        except httpx.HTTPStatusError as exc:
            error = FlowerError.from_json(exc.response.text)
            if error is not None and error.code == _public_key_in_use():  # not by an enrolled node: see register
                raise KeyRevoked(f"{what}: this public key belonged to a revoked node and cannot enroll again; "
                                 "make a new key pair (remove node.key, then fedlora client keygen)") from None
            reason = error.message if error else exc.response.text[:300]
            raise RegistryError(f"{what} at {self.address} failed ({exc.response.status_code}): {reason}") from None
        except httpx.HTTPError as exc:
            raise RegistryError(f"{what}: the SuperLink's Control API at {self.address} does not answer "
                                f"({exc or type(exc).__name__})") from None
        finally:
            client.close()

    def nodes(self) -> list[EnrolledNode]:
        from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=no-name-in-module

        with self._control("listing nodes") as control:
            reply = control.ListNodes(ListNodesRequest())
        return [EnrolledNode(node_id=n.node_id, name=n.name, status=n.status, public_key=n.public_key)
                for n in reply.nodes_info if n.status != GONE]

    def register(self, *, name: str, public_key: bytes) -> int:
        """Register an OpenSSH public key under ``name``; returns the SuperNode ID."""
        from flwr.proto.control_pb2 import RegisterNodeRequest  # pylint: disable=no-name-in-module
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes

        key = public_key_to_bytes(parse_node_public_key(public_key, source=f"the public key for {name!r}"))
        enrolled = self.nodes()
        for node in enrolled:
            if node.public_key == key:
                raise KeyInUse(f"this public key is already enrolled, as {node.name!r} (SuperNode {node.node_id})")
            if node.name == name:
                raise NameInUse(f"a node named {name!r} is already enrolled (SuperNode {node.node_id}, "
                                f"{node.status}); revoke it first (fedlora coordinator revoke {name})")
        with self._control(f"registering {name!r}") as control:
            reply = control.RegisterNode(RegisterNodeRequest(public_key=key, name=name))
        if not reply.node_id:
            raise RegistryError(f"registering {name!r}: the SuperLink returned no node ID")
        return reply.node_id

    def unregister(self, node_id: int) -> None:
        from flwr.proto.control_pb2 import UnregisterNodeRequest  # pylint: disable=no-name-in-module

        with self._control(f"unregistering SuperNode {node_id}") as control:
            control.UnregisterNode(UnregisterNodeRequest(node_id=node_id))


def _public_key_in_use() -> int:
    from flwr.supercore.error import ApiErrorCode

    return int(ApiErrorCode.PUBLIC_KEY_ALREADY_IN_USE)

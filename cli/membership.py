"""The operator's enrollment commands: ``fedlora coordinator invite | register | nodes | revoke``.

  invite    a one-time, expiring token for a node name (cli/enrollment.py's TokenStore,
            in HOME; works before the coordinator starts, e.g. in a setup script)
  register  a node's public key under a name, directly (the node sent its node.pub)
  nodes     the enrolled nodes (the SuperLink's registry) and the unused invitations
  revoke    unregister a node by name and cancel its unused invitations; Flower keeps a
            revoked key taken, so that key can never enroll again

All but ``invite`` call the SuperLink's Control API on loopback: they run on the coordinator
machine, and find the SuperLink and its CA in HOME/endpoints.json, which ``start`` writes.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from cli.certs import load_node_public_key
from cli.console import console
from cli.enrollment import TokenStore, check_name, parse_duration
from cli.node_registry import NodeRegistry
from cli.flower import COORDINATOR_HOME


def add_actions(actions: argparse._SubParsersAction) -> None:
    invite = actions.add_parser("invite", help="issue a one-time, expiring enrollment token for a node name")
    invite.add_argument("--name", required=True, help="the node's name (letters, digits, . _ -)")
    invite.add_argument("--valid-for", default="24h", help="until it expires: 90s, 30m, 24h, 7d (default 24h)")
    invite.add_argument("--token-file", default=None,
                        help="write the token to this file (mode 0600) instead of printing it; kept if it exists")
    add_home(invite, "the coordinator's state directory (its token store)")

    register = actions.add_parser("register", help="enroll a node's public key (on the coordinator machine)")
    register.add_argument("--name", required=True, help="the node's name (letters, digits, . _ -)")
    register.add_argument("--public-key", required=True, help="the node's node.pub (fedlora client keygen)")
    add_home(register, "the coordinator's state directory")

    nodes = actions.add_parser("nodes", help="list enrolled nodes and pending invitations")
    add_home(nodes, "the coordinator's state directory")

    revoke = actions.add_parser("revoke", help="unregister a node (its key is refused from then on)")
    revoke.add_argument("name", help="the node's name")
    add_home(revoke, "the coordinator's state directory")


def add_home(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--home", default=COORDINATOR_HOME, help=f"{what} (default: {COORDINATOR_HOME})")


@dataclass(frozen=True, kw_only=True)
class Endpoints:
    """Where a running coordinator listens: written by ``start``, read by the operator commands."""

    FILE: ClassVar[str] = "endpoints.json"
    public: str  # what clients use: HOSTNAME:PORT
    local: str  # the SuperLink itself, loopback only
    ca: Path | None

    def write(self, home: Path) -> None:
        (home / self.FILE).write_text(json.dumps({"public": self.public, "local": self.local,
                                                  "ca": str(self.ca) if self.ca else None}) + "\n")

    @classmethod
    def read(cls, home: Path) -> Endpoints:
        path = home / cls.FILE
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r} does not exist: no coordinator was started with --home {home} "
                                    "on this machine (run this where `fedlora coordinator start` runs)")
        data = json.loads(path.read_text())
        return cls(public=data["public"], local=data["local"], ca=Path(data["ca"]) if data["ca"] else None)

    def registry(self) -> NodeRegistry:
        return NodeRegistry(address=self.local, ca=self.ca)


def coordinator_invite(args: argparse.Namespace) -> int:
    home = Path(args.home).expanduser().resolve()
    name, valid_for = check_name(args.name), parse_duration(args.valid_for)
    out = Path(args.token_file).expanduser().resolve() if args.token_file else None
    if out is not None and out.exists():  # re-running a setup script must not pile up tokens
        console.print(f"keeping the invitation already in {out} (remove it to issue a new one)", markup=False)
        return 0
    token = TokenStore.in_home(home).issue(name=name, valid_for=valid_for)
    expires = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() + valid_for))
    if out is not None:
        _write_secret(out, token + "\n")
        shown, option = f"in {out}", f"--token-file {out}"
    else:
        shown, option = token, f"--token {token}"
    try:
        endpoints = Endpoints.read(home)
        connect = f"--coordinator {endpoints.public} " + ("--ca ca.crt" if endpoints.ca else "--insecure")
    except FileNotFoundError:
        connect = "--coordinator HOST:PORT --ca ca.crt"
    console.print(f"one-time enrollment token for {name!r}, valid until {expires}: {shown}\n"
                  f"  on the node: fedlora client enroll {connect} {option}", markup=False, highlight=False)
    return 0


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def coordinator_register(args: argparse.Namespace) -> int:
    home = Path(args.home).expanduser().resolve()
    name = check_name(args.name)
    public = Path(args.public_key).expanduser().resolve()
    load_node_public_key(public)  # a missing or malformed file is named before any call
    node_id = Endpoints.read(home).registry().register(name=name, public_key=public.read_bytes())
    console.print(f"enrolled node {name!r} (SuperNode {node_id}) with key {public}", markup=False)
    return 0


def coordinator_nodes(args: argparse.Namespace) -> int:
    home = Path(args.home).expanduser().resolve()
    nodes = Endpoints.read(home).registry().nodes()
    pending = TokenStore.in_home(home).pending()
    console.print(f"{'name':<24} {'SuperNode':>20}  status", markup=False)
    for node in sorted(nodes, key=lambda n: n.name):
        console.print(f"{node.name or '-':<24} {node.node_id:>20}  {node.status}", markup=False)
    for invitation in pending:
        expires = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(invitation.expires_at))
        console.print(f"{invitation.name:<24} {'-':>20}  invited (token unused, expires {expires})", markup=False)
    if not nodes and not pending:
        console.print("no enrolled nodes and no pending invitations", markup=False)
    return 0


def coordinator_revoke(args: argparse.Namespace) -> int:
    home = Path(args.home).expanduser().resolve()
    registry = Endpoints.read(home).registry()
    nodes = registry.nodes()
    named = [n for n in nodes if n.name == args.name]
    cancelled = TokenStore.in_home(home).cancel(args.name)  # an outstanding token must not re-admit it
    if not named and not cancelled:
        known = ", ".join(sorted({n.name for n in nodes if n.name})) or "none"
        raise ValueError(f"no enrolled node or pending invitation is named {args.name!r} (enrolled: {known})")
    for node in named:
        registry.unregister(node.node_id)
        console.print(f"revoked node {args.name!r} (SuperNode {node.node_id}): the SuperLink refuses its key "
                      "from now on", markup=False)
    if cancelled:
        console.print(f"cancelled {cancelled} unused invitation(s) for {args.name!r}", markup=False)
    return 0


ACTIONS: dict[str, Callable[[argparse.Namespace], int]] = {
    "invite": coordinator_invite, "register": coordinator_register, "nodes": coordinator_nodes,
    "revoke": coordinator_revoke,
}

"""The coordinator side of a deployment: ``fedlora coordinator ...`` (``fedlora run``: cli/submit.py).

  fedlora coordinator certs --hostname H --out DIR      a CA and a server certificate for H
  fedlora coordinator start [--host --port --local-port --db ...]
                  Flower's flower-superlink on 127.0.0.1:LOCAL (TLS and SuperNode
                  authentication on, state in a database file), and the public front on
                  HOST:PORT (cli/front.py): the Fleet API and enrollment, nothing else
  fedlora coordinator invite --name N [--valid-for 24h]  a one-time enrollment token for N
  fedlora coordinator register --name N --public-key F  enroll a node's key directly
  fedlora coordinator nodes | revoke NAME               enrolled nodes; remove one for good
  fedlora coordinator check --coordinator H:P --ca F    TLS handshake + health (healthchecks)
  fedlora run [--coordinator 127.0.0.1:LOCAL] --ca F    submit the app with ``flwr run``

The Control API (runs, nodes) is reachable on the coordinator machine only: ``run``,
``register``, ``nodes`` and ``revoke`` go to the loopback port (``start`` writes it, with
the CA, to HOME/endpoints.json; from elsewhere, an SSH tunnel to it). The ServerApp runs
inside the coordinator (the SuperLink starts it per run) and logs rounds to the
coordinator's database: run-config ``db-url`` when the run sets it, else the coordinator's
``--db`` (handed to it as FEDLORA_DB_URL).
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import Callable
from pathlib import Path

from cli.certs import TlsFiles, certificate_names, generate_tls, probe
from cli.console import console
from core.config import DB_ENV, default_db_url
from server.db.session import masked, open_database
from cli.enrollment import Enroller, TokenStore
from cli.flower import (
    COORDINATOR_HOME, DEFAULT_PORT, LOOPBACK, OPERATOR_PORT, Daemon, add_connection_args, connection_ca, flower_env, reported, write_connection,
)
from cli.membership import ACTIONS as MEMBERSHIP_ACTIONS
from cli.membership import Endpoints, add_home
from cli.membership import add_actions as add_membership_actions
from cli.local_superlink import flower_bin

READY_TIMEOUT = 90.0


# --- coordinator ---------------------------------------------------------------------------


def add_coordinator_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("coordinator", help="run the coordinator (Flower SuperLink + ServerApp) and enroll nodes")
    actions = p.add_subparsers(dest="action", required=True)

    start = actions.add_parser("start", help="start the SuperLink on loopback and the public front")
    start.add_argument("--host", default="0.0.0.0", help="interface of the public port (default: all)")
    start.add_argument("--port", type=int, default=DEFAULT_PORT,
                       help="public port: the Fleet API for SuperNodes, and enrollment")
    start.add_argument("--local-port", type=int, default=OPERATOR_PORT,
                       help=f"the SuperLink's port on {LOOPBACK} (all of Flower's APIs): operators only")
    start.add_argument("--hostname", action="append", default=None,
                       help="name clients use to reach this machine (repeatable; generated certificate, "
                            "printed address). Default: this machine's host name")
    add_home(start, "state directory: SuperLink database, Flower home, certificates, enrollment tokens")
    start.add_argument("--ca", default=None, help="CA certificate (PEM); with --cert and --key")
    start.add_argument("--cert", default=None, help="server certificate (PEM); must also name 127.0.0.1")
    start.add_argument("--key", default=None, help="server private key (PEM)")
    start.add_argument("--db", default=None, help=f"round-log database URL (default: ${DB_ENV} or runs/fedlora.db)")
    start.add_argument("--insecure", action="store_true", help="no TLS (needs --no-node-auth); testing only")
    start.add_argument("--no-node-auth", action="store_true", help="accept any SuperNode; testing only")

    certs = actions.add_parser("certs", help="generate a CA and a server certificate for a host name")
    certs.add_argument("--hostname", action="append", required=True, help="DNS name or IP (repeatable)")
    certs.add_argument("--out", required=True, help="directory for ca.crt, ca.key, server.crt, server.key")
    certs.add_argument("--days", type=int, default=825)
    certs.add_argument("--force", action="store_true", help="replace existing certificates")

    check = actions.add_parser("check", help="check that a coordinator answers over TLS with this CA")
    add_connection_args(check)
    check.add_argument("--timeout", type=float, default=5.0)

    add_membership_actions(actions)


@reported
def coordinator(args: argparse.Namespace) -> int:
    actions: dict[str, Callable[[argparse.Namespace], int]] = {
        "start": coordinator_start, "certs": coordinator_certs, "check": coordinator_check, **MEMBERSHIP_ACTIONS,
    }
    return actions[args.action](args)


def coordinator_certs(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser().resolve()
    existing = TlsFiles.in_dir(out)
    if existing.complete() and not args.force:
        console.print(f"certificates already in {out}; keeping them (--force replaces them)", markup=False)
        return 0
    files = generate_tls(out, hostnames=args.hostname, days=args.days)
    console.print(f"CA certificate:     {files.ca_cert}  (give this file to every client)", markup=False)
    console.print(f"server certificate: {files.server_cert}  (for {', '.join(args.hostname)})", markup=False)
    console.print(f"server key:         {files.server_key}", markup=False)
    return 0


def coordinator_check(args: argparse.Namespace) -> int:
    ca = connection_ca(args)
    probe(args.coordinator, ca=ca, tls=not args.insecure, timeout=args.timeout)
    console.print(f"coordinator {args.coordinator} is up ({'TLS verified' if ca else 'no TLS'})", markup=False)
    return 0


def coordinator_start(args: argparse.Namespace) -> int:
    from cli.front import FrontApp, FrontServer  # uvicorn and httpx: only the coordinator needs them

    if args.insecure and not args.no_node_auth:
        raise ValueError("--insecure needs --no-node-auth: Flower authenticates SuperNodes only over TLS")
    if args.local_port == args.port:
        raise ValueError(f"--local-port {args.local_port} must differ from the public --port {args.port}")
    home = Path(args.home).expanduser().resolve()
    hostnames = args.hostname or [socket.gethostname()]
    db_url = args.db or default_db_url()
    open_database(db_url)  # unreachable or invalid: fails now, naming the URL
    _check_port_free(args.host, args.port)
    _check_port_free(LOOPBACK, args.local_port)
    tls = None if args.insecure else _server_tls(args, home / "certs", hostnames)
    local = f"{LOOPBACK}:{args.local_port}"
    endpoints = Endpoints(public=f"{hostnames[0]}:{args.port}", local=local, ca=tls.ca_cert if tls else None)

    (home / "flwr").mkdir(parents=True, exist_ok=True)
    superlink = Daemon(command=_superlink_command(home, local_port=args.local_port, tls=tls,
                                                  node_auth=not args.no_node_auth),
                       env=flower_env(home / "flwr", {DB_ENV: db_url}))
    enroller = Enroller(store=TokenStore.in_home(home), registry=endpoints.registry())
    front = FrontServer(app=FrontApp(upstream=f"{'https' if tls else 'http'}://{local}", ca=endpoints.ca,
                                     enroller=enroller, operator_hint=" Operators: the coordinator machine's "
                                                                      "loopback port, or an SSH tunnel to it."),
                        host=args.host, port=args.port, tls=tls, on_failure=superlink.terminate)
    superlink.start()
    try:
        superlink.wait_ready(lambda: _answers(local, tls=tls is not None), timeout=READY_TIMEOUT,
                             what="flower-superlink")
        front.start()
        front.wait_ready(timeout=READY_TIMEOUT)
    except (RuntimeError, TimeoutError) as exc:
        superlink.stop()
        if superlink.signalled:  # stopped while starting: as a signal, not as a failure
            return 128 + superlink.signalled
        raise RuntimeError(f"{exc}\n{superlink.output()[-3000:]}") from None
    try:
        endpoints.write(home)
        write_connection(home / "operator", address=local, ca=endpoints.ca)
        _print_ready(args, endpoints, home, db_url, tls=tls)
        status = superlink.exit_status()
    finally:
        front.stop()
    if front.error:
        raise RuntimeError(f"the public front on {args.host}:{args.port} stopped: {front.error}")
    return status


def _superlink_command(home: Path, *, local_port: int, tls: TlsFiles | None, node_auth: bool) -> list[str]:
    command = [flower_bin("flower-superlink"), "--host", LOOPBACK, "--port", str(local_port),
               "--database", str(home / "superlink-state.db"), "--isolation", "subprocess",
               "--disable-runtime-dependency-installation"]
    if tls is None:
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                    "--ssl-keyfile", str(tls.server_key)]
    if node_auth:
        command.append("--enable-supernode-auth")
    return command


def _print_ready(args: argparse.Namespace, endpoints: Endpoints, home: Path, db_url: str, *,
                 tls: TlsFiles | None) -> None:
    ca = f"--ca {tls.ca_cert}" if tls else "--insecure"
    at_home = "" if args.home == COORDINATOR_HOME else f" --home {args.home}"
    console.print(
        f"\nfedlora coordinator ready (TLS {'on' if tls else 'off'}, "
        f"SuperNode authentication {'off' if args.no_node_auth else 'on'})\n"
        f"  public port {args.host}:{args.port}: the Fleet API (SuperNodes) and enrollment only\n"
        f"  clients connect with:  --coordinator {endpoints.public} {ca}\n"
        f"  CA certificate:        {tls.ca_cert if tls else '-'}  (copy it to every client machine)\n"
        f"  enroll a node:         fedlora coordinator invite --name NAME{at_home}, then on the node:\n"
        f"                         fedlora client enroll --coordinator {endpoints.public} {ca} --token TOKEN\n"
        f"                         (or: fedlora coordinator register --name NAME --public-key node.pub{at_home})\n"
        f"  operators, on this machine only: {endpoints.local} (runs, nodes: the Control API)\n"
        f"                         fedlora run --coordinator {endpoints.local} {ca} ...\n"
        f"                         FLWR_HOME={home / 'operator'} flwr ls\n"
        f"  SuperLink state:       {home / 'superlink-state.db'}\n"
        f"  round log:             {masked(db_url)}\n",
        markup=False, highlight=False,
    )


def _server_tls(args: argparse.Namespace, generated: Path, hostnames: list[str]) -> TlsFiles:
    given = {"--ca": args.ca, "--cert": args.cert, "--key": args.key}
    if any(given.values()):
        missing = [flag for flag, value in given.items() if not value]
        if missing:
            raise ValueError(f"TLS needs --ca, --cert and --key together; missing {', '.join(missing)}")
        for flag, value in given.items():
            if not Path(value).expanduser().is_file():
                raise FileNotFoundError(f"{flag} {value!r} does not exist")
        files = TlsFiles(ca_cert=Path(args.ca).expanduser().resolve(), ca_key=None,
                         server_cert=Path(args.cert).expanduser().resolve(),
                         server_key=Path(args.key).expanduser().resolve())
        if LOOPBACK not in certificate_names(files.server_cert):
            # the front and the SuperLink's own ServerApp runtime verify it at 127.0.0.1
            raise ValueError(f"--cert {args.cert!r} does not name {LOOPBACK} (it names "
                             f"{', '.join(certificate_names(files.server_cert)) or 'nothing'}); the SuperLink "
                             f"listens there (fedlora coordinator certs always adds it)")
        return files
    files = TlsFiles.in_dir(generated)
    if files.complete():
        unnamed = [h for h in hostnames if h not in certificate_names(files.server_cert)]
        if unnamed:  # clients would fail later with an obscure TLS error
            raise ValueError(f"the certificate in {generated} does not name {', '.join(map(repr, unnamed))} "
                             f"(it names {', '.join(certificate_names(files.server_cert))}); remove {generated} "
                             "to generate new ones (enrolled nodes then need the new CA)")
        return files
    console.print(f"no certificates given: generating a CA and a server certificate for "
                  f"{', '.join(hostnames)} in {generated}", markup=False)
    return generate_tls(generated, hostnames=hostnames)


def _check_port_free(host: str, port: int) -> None:
    # A busy port would let the readiness check talk to some other server.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _answers(address: str, *, tls: bool) -> bool:
    try:
        probe(address, ca=None, tls=tls, timeout=2.0)
        return True
    except ConnectionError:
        return False

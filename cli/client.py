"""Client machines: ``fedlora client keygen | enroll | start | demo-data``.

  keygen     the node's key pair (EC P-384, OpenSSH format: what flower-supernode loads)
  enroll     keygen if needed, then redeem a one-time token from the coordinator's
             operator (``fedlora coordinator invite``) for the public key, through the
             coordinator's public port; the SuperLink rejects any node whose key is not
             enrolled (the operator may also enroll a node.pub directly:
             ``fedlora coordinator register``)
  start      Flower's own flower-supernode with the node's key, the coordinator's CA and
             its node_config (LoRA rank, local data file, device, the share held out
             for federated evaluation, ``dp-*`` settings), validated first
  demo-data  one partition of a data source as an Alpaca JSONL file (demos, compose)

A node's state lives in one directory (``--home``): ``node.key``, ``node.pub``,
``enrollment.json`` (which token enrolled it where: running enroll again is harmless) and
Flower's home (installed app bundles, ``config.toml``).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cli.certs import NodeKeys, generate_node_keys, load_node_key, probe
from cli.console import console
from cli.enrollment import check_name, redeem_token, token_hash
from cli.flower import (
    Daemon, add_connection_args, connection_ca, flower_env, reported, write_toml,
)
from cli.local_superlink import flower_bin
from cli.node_worker import WorkerSupervisor, worker_socket
from client.app import WORKER_KEY
from cli.run_config import parse_assignment
from aggregation.base import check_rank
from core.config import RunConfig, check_node_eval_fraction, flower_key
from core.data import load_examples, partition, split_heldout
from privacy.settings import DP_PREFIX, check_node_config

CUDA_INDEX = re.compile(r"cuda:(\d+)")
# device -> CUDA_VISIBLE_DEVICES for the node's processes (None: leave as is). The ClientApp
# trains on CUDA whenever torch sees a GPU, so hiding GPUs is how "cpu" is enforced.
DEVICES: dict[str, str | None] = {"auto": None, "cuda": None, "cpu": ""}
PASS_THROUGH_PREFIX = DP_PREFIX  # differential-privacy settings, read by the ClientApp
READY_LINE = "SuperNode ID:"  # flower-supernode logs it once the SuperLink accepted the node
REJECTED = "Failed to activate SuperNode"
READY_TIMEOUT = 90.0
# SuperExec looks for a new message to start a ClientApp for every second by default:
# a fixed wait on every message of every round. (The SuperNode's own 3 s idle sleep
# between pulls from the SuperLink is Flower's, with no setting.)
NODE_POLL_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.05"}
ENROLLED = "enrollment.json"
# federated evaluation: the node's own held-out share, under the run-config key it overrides (client.node)
EVAL_FRACTION_KEY = flower_key("node_eval_fraction")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="a client node: keys, enrolment, SuperNode")
    actions = p.add_subparsers(dest="action", required=True)

    keygen = actions.add_parser("keygen", help="create the node's key pair (kept if it exists)")
    _add_home(keygen)

    enroll = actions.add_parser("enroll", help="create the node's key pair and enroll it with a one-time token")
    add_connection_args(enroll)
    _add_home(enroll)
    enroll.add_argument("--token", default=None, help="the token from `fedlora coordinator invite`")
    enroll.add_argument("--token-file", default=None, help="read the token from this file instead")
    enroll.add_argument("--name", default=None,
                        help="the name you were invited under; a token for another name is refused, unused")

    start = actions.add_parser("start", help="start the node's SuperNode")
    add_connection_args(start)
    _add_home(start)
    start.add_argument("--key", default=None, help="private key (default: HOME/node.key)")
    start.add_argument("--data", required=True, help="the node's local Alpaca JSONL file")
    start.add_argument("--rank", type=int, required=True, help="this node's LoRA rank")
    start.add_argument("--max-rank", type=int, default=RunConfig.max_rank, help="the federation's max-rank")
    start.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: the run's)")
    start.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    start.add_argument("--eval-fraction", type=float, default=None,
                       help="federated evaluation: share of this node's data held out (never trained on) to "
                            "evaluate the global adapter on, in (0, 1) (default: the run's node-eval-fraction; "
                            "used only in runs with fraction-evaluate > 0)")
    start.add_argument("--set", dest="extra", action="append", default=[], metavar="dp-KEY=VALUE",
                       help="extra node_config, only dp-* keys (repeatable)")
    start.add_argument("--no-worker", dest="worker", action="store_false",
                       help="no resident worker: every message starts a fresh ClientApp that loads the model "
                            "again (Flower's default; slower, for comparison and debugging)")
    start.add_argument("--runtime-port", type=int, default=9094,
                       help="local port of the SuperNode's runtime API (one per node on a machine)")

    demo = actions.add_parser("demo-data", help="write one partition of a data source as Alpaca JSONL")
    demo.add_argument("--out", required=True)
    demo.add_argument("--data", default="chatterbot")
    demo.add_argument("--partition", default="topic")
    demo.add_argument("--partition-id", type=int, required=True)
    demo.add_argument("--num-partitions", type=int, required=True)
    demo.add_argument("--seed", type=int, default=0)


def _add_home(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", default=".flwr/node", help="node state: node.key, node.pub, Flower home")


@reported
def client(args: argparse.Namespace) -> int:
    actions: dict[str, Callable[[argparse.Namespace], int]] = {
        "keygen": keygen, "enroll": enroll, "start": start, "demo-data": demo_data,
    }
    return actions[args.action](args)


def keygen(args: argparse.Namespace) -> int:
    keys = generate_node_keys(_home(args))
    console.print(f"node key: {keys.private}\npublic key: {keys.public}", markup=False)
    return 0


def enroll(args: argparse.Namespace) -> int:
    if args.name is not None:
        check_name(args.name)
    ca = connection_ca(args)
    keys = generate_node_keys(_home(args))
    probe(args.coordinator, ca=ca, tls=not args.insecure)
    token = _token(args)
    marker = _home(args) / ENROLLED
    done = json.loads(marker.read_text()) if marker.is_file() else {}
    if done.get("coordinator") == args.coordinator and done.get("token-sha256") == token_hash(token):
        # a restarted setup script: the token is spent, by this very node
        console.print(f"already enrolled as {done['name']!r} (SuperNode {done['node-id']}) with {args.coordinator}",
                      markup=False)
    else:
        reply = redeem_token(coordinator=args.coordinator, ca=ca, token=token, public_key=keys.public.read_text(),
                             name=args.name)
        if reply["status"] == 200:
            marker.write_text(json.dumps({"coordinator": args.coordinator, "name": reply["name"],
                                          "node-id": reply["node-id"], "token-sha256": token_hash(token)}) + "\n")
            console.print(f"enrolled node {reply['name']!r} (SuperNode {reply['node-id']}) with {args.coordinator}",
                          markup=False)
        elif reply.get("error") == "key-enrolled":  # enrolment is idempotent
            console.print(f"key {keys.public} is already enrolled with {args.coordinator}: {reply['detail']}",
                          markup=False)
        else:
            raise RuntimeError(f"coordinator {args.coordinator} refused the enrollment of {str(keys.public)!r} "
                               f"({reply['status']}): {reply.get('detail', reply)}")
    console.print(f"start it: fedlora client start --coordinator {args.coordinator} "
                  + (f"--ca {ca} " if ca else "--insecure ") + f"--home {_home(args)} --data FILE --rank R",
                  markup=False)
    return 0


def start(args: argparse.Namespace) -> int:
    config = node_config(rank=args.rank, max_rank=args.max_rank, data=args.data, alpha=args.alpha,
                         device=args.device, extra=args.extra, eval_fraction=args.eval_fraction)
    key = Path(args.key).expanduser().resolve() if args.key else NodeKeys.in_dir(_home(args)).private
    load_node_key(key)
    ca = connection_ca(args)
    probe(args.coordinator, ca=ca, tls=not args.insecure)
    flwr_home = _home(args) / "flwr"
    env = flower_env(flwr_home, {**device_env(args.device), **NODE_POLL_ENV})
    socket = worker_socket(_home(args)) if args.worker else None
    if socket is not None:  # the node's model stays loaded in the worker across rounds and runs
        config[WORKER_KEY] = str(socket)
    config_file = write_toml(flwr_home / "node-config.toml", config)
    command = [flower_bin("flower-supernode"), "--superlink", args.coordinator, "--auth-supernode-private-key",
               str(key), "--node-config", str(config_file), "--port", str(args.runtime_port),
               "--isolation", "subprocess"]
    command += ["--root-certificates", str(ca)] if ca else ["--insecure"]
    daemon = Daemon(command=command, env=env, ready_line=READY_LINE)
    worker = None
    if socket is not None:  # started once the SuperLink accepted the node: a rejected node loads nothing
        worker = WorkerSupervisor(socket=socket, env=env, on_give_up=lambda _why: daemon.terminate())
    try:
        code = _run_supernode(args, daemon=daemon, worker=worker, config=config, key=key)
    finally:
        if worker is not None:
            worker.stop()
    if worker is not None and worker.gave_up:
        raise RuntimeError(worker.gave_up)
    return code


def _run_supernode(args: argparse.Namespace, *, daemon: Daemon, worker: WorkerSupervisor | None,
                   config: dict[str, Any], key: Path) -> int:
    daemon.start()
    try:
        daemon.wait_ready(daemon.ready.is_set, timeout=READY_TIMEOUT, what="flower-supernode")
    except (RuntimeError, TimeoutError) as exc:
        if REJECTED in daemon.output():
            # Flower answers both cases with the same "[code: 2004] Failed to activate SuperNode"
            raise RuntimeError(f"coordinator {args.coordinator} rejected this node (key {str(key)!r}): the key is "
                               "not enrolled (fedlora client enroll --token), was revoked, or a node with it is "
                               "already online") from None
        raise RuntimeError(f"{exc}\n{daemon.output()[-3000:]}") from None
    if worker is not None:
        try:
            worker.start()
            worker.wait_ready()
        except (RuntimeError, TimeoutError):
            daemon.stop()
            raise
    where = f"; node worker on {config[WORKER_KEY]}" if WORKER_KEY in config else "; no node worker"
    console.print(f"node connected to {args.coordinator} (rank {args.rank}, data {config['data-path']}{where}); "
                  "waiting for runs", markup=False)
    return daemon.exit_status()


def node_config(*, rank: int, max_rank: int, data: str, alpha: float | None, device: str,
                extra: list[str], eval_fraction: float | None = None) -> dict[str, Any]:
    """The SuperNode's node_config, validated; every error names the offending value."""
    check_rank(rank, max_rank)
    path = Path(data).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"data file {data!r} does not exist")
    load_examples(str(path))  # malformed rows are named now, not in the middle of a round
    device_env(device)
    config: dict[str, Any] = {"lora-rank": rank, "data-path": str(path), "device": device}
    if alpha is not None:
        if not alpha > 0:
            raise ValueError(f"--alpha must be > 0, got {alpha}")
        config["lora-alpha"] = alpha
    if eval_fraction is not None:
        check_node_eval_fraction(eval_fraction, where="--eval-fraction")
        config[EVAL_FRACTION_KEY] = eval_fraction
    for text in extra:
        key, value = parse_assignment(text, option="--set")
        if not key.startswith(PASS_THROUGH_PREFIX):
            raise ValueError(f"--set {text!r}: only {PASS_THROUGH_PREFIX}* keys pass through "
                             "(rank, data, alpha and device have their own options)")
        config[key] = value
    # a misspelt or unparsable dp-* key must stop the node now: ignored, it would drop the
    # node's own (stricter) budget without a word
    check_node_config(config)
    return config


def device_env(device: str) -> dict[str, str]:
    if device in DEVICES:
        visible = DEVICES[device]
    elif match := CUDA_INDEX.fullmatch(device):
        visible = match.group(1)
    else:
        raise ValueError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")
    return {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}


def demo_data(args: argparse.Namespace) -> int:
    if not 0 <= args.partition_id < args.num_partitions:
        raise ValueError(f"--partition-id {args.partition_id} is outside 0..{args.num_partitions - 1}")
    # leave out the server's held-out split, so the coordinator evaluates on unseen examples
    train, _ = split_heldout(load_examples(args.data), RunConfig.eval_fraction, args.seed)
    rows = partition(train, args.partition, args.num_partitions, args.seed)[args.partition_id]
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for ex in rows:
            fh.write(json.dumps({"instruction": ex.prompt, "output": ex.response, "category": ex.category}) + "\n")
    console.print(f"wrote {len(rows)} examples to {out}", markup=False)
    return 0


def _home(args: argparse.Namespace) -> Path:
    return Path(args.home).expanduser().resolve()


def _token(args: argparse.Namespace) -> str:
    if args.token and args.token_file:
        raise ValueError(f"--token and --token-file {args.token_file!r} contradict each other")
    if args.token_file:
        path = Path(args.token_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"token file {args.token_file!r} does not exist")
        token = path.read_text().strip()
    else:
        token = (args.token or "").strip()
    if not token:
        raise ValueError("--token (or --token-file) is required: the coordinator's operator issues one with "
                         "`fedlora coordinator invite --name NAME`")
    return token


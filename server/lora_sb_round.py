"""Fed-SB's initialisation before round 1, from the source the run config names (``sb-init``).

``initialise`` runs once per run (never on a resume: the checkpoint holds the state) and
returns what the aggregator starts from plus what the run's record keeps
(``RunRecorder.record_init``, table ``initialisations``):

* ``server-public``: LoRA-SB's own init on the coordinator's public examples
  (``server.calibration``); recorded: the calibration and evaluation example ids;
* ``federated``: round 0. Every connected node is asked who it is (the usual rank query),
  ``clients-per-round`` of them are sampled by their stable keys with the run seed, and each
  sends the linear sketches of its summed gradient (``client.lora_sb``, action
  ``query.lora_sb``); the server sums them and takes the init from the sum
  (``aggregation.sb_sketch``, which states how it differs from LoRA-SB's sign step).
  Recorded: each node's status, reason, bytes and ε, and the bytes in all;
* ``random``: no LoRA-SB init (ablation): seeded orthonormal bases and R = 0.

The SVDs run under the server's thread limit (``server-threads``, ``server.threads``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

import aggregation
from aggregation.base import ModelSpec, Tensors
from aggregation.sb_sketch import init_from_sketches, sketch_matrices, sketch_sizes
from core.config import RunConfig
from core.wire import record_bytes, record_to_tensors
from privacy.settings import local_dp
from server.calibration import PublicSplit, server_public_init
from server.replies import reason
from server.rounds import ClientOutcome, InsufficientReplies
from server.threads import server_math
from server.validation import UpdateLimits, check_size

ACTION = f"{MessageType.QUERY}.lora_sb"  # client.lora_sb.ACTION, registered by the ClientApp
QUERY_TIMEOUT = 600.0


@dataclass(frozen=True)
class InitRequest:
    cfg: RunConfig
    base: Any  # core.presets.BaseModel
    spec: ModelSpec
    split: PublicSplit
    grid: Grid | None


@dataclass(frozen=True)
class InitResult:
    kind: str
    initial: Tensors | None  # None: the aggregator's own (random) init
    seconds: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0
    details: dict[str, Any] = field(default_factory=dict)


def initialise(request: InitRequest) -> InitResult | None:
    """The run's init (None for an aggregator that takes none), timed."""
    if not aggregation.get_class(request.cfg.aggregator).accepts_calibration:
        return None
    start = time.perf_counter()
    result = SOURCES[request.cfg.sb_init](request)
    seconds = time.perf_counter() - start
    log(INFO, "fedlora: Fed-SB init %s in %.2f s (%d bytes up, %d down)", result.kind, seconds, result.bytes_up,
        result.bytes_down)
    return InitResult(kind=result.kind, initial=result.initial, seconds=seconds, bytes_down=result.bytes_down,
                      bytes_up=result.bytes_up, details=result.details)


def _random(request: InitRequest) -> InitResult:
    return InitResult(kind="random", initial=None)


def _server_public(request: InitRequest) -> InitResult:
    cfg, split = request.cfg, request.split
    return InitResult(kind="server-public", initial=server_public_init(cfg, request.base, split), details={
        "source": split.source, "calibration-ids": split.ids(split.calibration),
        "evaluation-ids": split.ids(split.evaluation[: cfg.eval_examples]),
    })


def check_federated(cfg: RunConfig) -> None:
    """Refuse a federated init that would release node data outside every privacy account."""
    if cfg.dp_central_clip > 0 and local_dp(cfg.to_flower()) is None:
        raise ValueError("sb-init=federated with central DP (dp-central-clip) and no local DP-SGD would send each "
                         "node's gradient sketch un-noised, outside the user-level accounting; switch on local DP "
                         "(dp-epsilon or dp-noise-multiplier) or use sb-init=server-public")


def federated(request: InitRequest) -> InitResult:
    cfg, spec, grid = request.cfg, request.spec, request.grid
    if grid is None:
        raise ValueError("sb-init=federated needs the nodes: the init runs in the ServerApp, before round 1")
    check_federated(cfg)
    sampled = _sample(_node_keys(grid, spec.max_rank), cfg.clients_per_round, seed=spec.seed)
    if len(sampled) < cfg.min_clients:
        raise InsufficientReplies(f"federated LoRA-SB init: only {len(sampled)} usable nodes connected; "
                                  f"min-clients is {cfg.min_clients}")
    config = ConfigRecord({"rank": spec.max_rank, "oversample": cfg.sb_init_oversample, "sketch-seed": spec.seed,
                           "examples": cfg.calibration_batches * cfg.batch_size, "batch-size": cfg.batch_size,
                           "max-seq-len": cfg.max_seq_len})
    messages = [Message(RecordDict({"config": config}), dst_node_id=n, message_type=ACTION) for n in sampled]
    bytes_down = {m.metadata.dst_node_id: record_bytes(m.content) for m in messages}
    replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(messages, timeout=cfg.round_timeout)}
    sizes = {name: sketch_sizes(s, rank=spec.max_rank, oversample=cfg.sb_init_oversample)
             for name, s in spec.modules.items()}
    limits = UpdateLimits(max_payload_bytes=int(cfg.max_payload_mb * 2**20))
    total = {name: {"Y": np.zeros((s.d_out, sizes[name][0])), "W": np.zeros((sizes[name][1], s.d_in))}
             for name, s in spec.modules.items()}
    outcomes = []
    for node, key in sampled.items():
        outcome, sketches = _read(node, replies.get(node), spec=spec, sizes=sizes, limits=limits,
                                  bytes_down=bytes_down[node], timeout=cfg.round_timeout)
        outcomes.append((key, outcome))
        for name, f in (sketches or {}).items():
            total[name]["Y"] += f["Y"]
            total[name]["W"] += f["W"]
    usable = [o for _, o in outcomes if o.status == "ok"]
    if len(usable) < cfg.min_clients:
        said = "; ".join(f"{k}: {o.status} ({o.reason})" for k, o in outcomes if o.status != "ok")
        raise InsufficientReplies(f"federated LoRA-SB init: {len(usable)} usable contributions < min-clients "
                                  f"{cfg.min_clients} ({said})")
    with server_math(cfg.server_threads):
        initial = {}
        for name, s in sorted(spec.modules.items()):
            _, psi = sketch_matrices(spec.seed, name, s, rank=spec.max_rank, oversample=cfg.sb_init_oversample)
            initial[name] = init_from_sketches(total[name]["Y"], total[name]["W"], psi, s, rank=spec.max_rank,
                                               learning_rate=cfg.sb_init_lr)
    nodes = [{"node": key, "status": o.status, "reason": o.reason, "examples": o.num_examples,
              "bytes_down": o.bytes_down, "bytes_up": o.bytes_up, "metrics": o.metrics} for key, o in outcomes]
    return InitResult(kind="federated", initial=initial, bytes_down=sum(o.bytes_down for _, o in outcomes),
                      bytes_up=sum(o.bytes_up for _, o in outcomes), details={
                          "nodes": nodes, "oversample": cfg.sb_init_oversample,
                          "examples": sum(o.num_examples or 0 for o in usable)})


#: sb-init -> how it is computed; the names are aggregation.fed_sb.INIT_SOURCES (the config checks them)
SOURCES: dict[str, Callable[[InitRequest], InitResult]] = {
    "server-public": _server_public, "federated": federated, "random": _random,
}  # tests/server/test_lora_sb_round.py checks that the two agree


def _node_keys(grid: Grid, max_rank: int) -> dict[int, str]:
    """Flower node id -> the node's stable key, for every connected node that answers the rank query."""
    nodes = sorted(grid.get_node_ids())
    queries = [Message(RecordDict({"config": ConfigRecord({"max-rank": max_rank})}), dst_node_id=n,
                       message_type=MessageType.QUERY) for n in nodes]
    keys = {}
    for reply in grid.send_and_receive(queries, timeout=QUERY_TIMEOUT):
        if reply.has_error():
            continue  # the node is refused here as in round 1's discovery, which says why
        node = reply.metadata.src_node_id
        identity = reply.content.config_records.get("identity")
        keys[node] = str(identity["node-key"]) if identity is not None and identity.get("node-key") else str(node)
    return keys


def _sample(keys: dict[int, str], count: int, *, seed: int) -> dict[int, str]:
    """``count`` nodes by stable key with the run seed: the same nodes in a repeat of the run."""
    ordered = sorted(keys, key=keys.__getitem__)
    rng = np.random.default_rng([seed, 0x5B])  # its own stream: round 1's sampling is left as it was
    picked = sorted(rng.choice(len(ordered), size=min(count, len(ordered)), replace=False)) if ordered else []
    return {ordered[i]: keys[ordered[i]] for i in picked}


def _read(node: int, reply: Message | None, *, spec: ModelSpec, sizes: dict[str, tuple[int, int]],
          limits: UpdateLimits, bytes_down: int, timeout: float) -> tuple[ClientOutcome, Tensors | None]:
    """One node's contribution, or the reason it is not used (a malformed one never stops the server)."""
    if reply is None:
        return ClientOutcome(node, "failed", f"no reply before the deadline ({timeout:.0f} s)",
                             bytes_down=bytes_down), None
    if reply.has_error():
        return ClientOutcome(node, "failed", f"client error: {reply.error.reason}", bytes_down=bytes_down), None
    base: dict[str, Any] = {"node_id": node, "bytes_down": bytes_down}
    try:
        content = reply.content
        base["bytes_up"] = record_bytes(content)
        metrics = dict(content["metrics"]) if "metrics" in content.metric_records else {}
        base["metrics"] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        status = content.config_records.get("status", ConfigRecord({"status": "ok"}))
        if str(status.get("status", "ok")) != "ok":
            return ClientOutcome(status=str(status["status"]), reason=str(status.get("reason") or ""), **base), None
        check_size(base["bytes_up"], limits)
        sketches = _checked(record_to_tensors(content["update"]), spec, sizes)
        examples = int(base["metrics"]["num-examples"])
    except Exception as exc:  # noqa: BLE001 - the node's malformation is a rejection with a reason
        return ClientOutcome(status="rejected", reason=reason(exc), **base), None
    return ClientOutcome(status="ok", num_examples=examples, seconds=base["metrics"].get("init-seconds"),
                         **base), sketches


def _checked(tensors: Tensors, spec: ModelSpec, sizes: dict[str, tuple[int, int]]) -> Tensors:
    if set(tensors) != set(spec.modules):
        raise ValueError(f"sketch modules differ from the model's: missing {sorted(set(spec.modules) - set(tensors))}"
                         f", unknown {sorted(set(tensors) - set(spec.modules))}")
    out: Tensors = {}
    for name, shape in spec.modules.items():
        k, l = sizes[name]
        want = {"Y": (shape.d_out, k), "W": (l, shape.d_in)}
        got = {f: tuple(np.shape(v)) for f, v in tensors[name].items()}
        if got != want:
            raise ValueError(f"sketch of {name} has shapes {got}, expected {want}")
        values = {f: np.asarray(v, dtype=np.float64) for f, v in tensors[name].items()}
        if not all(np.isfinite(v).all() for v in values.values()):
            raise ValueError(f"sketch of {name} has non-finite values")
        out[name] = values
    return out

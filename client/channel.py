"""The local channel between the thin ClientApp and the node's resident worker.

gRPC over a Unix socket in a directory only the node's user can enter (0700), the
socket itself 0600: nothing else on the machine, and nothing on the network, can hand
the worker a round. One generic method carries raw bytes framed here, so no protobuf
of our own needs compiling: the request is (version, action, Flower's Message proto,
Flower's Context proto), the answer (version, "ok" + the reply's RecordDict + the
node's new context state, or "error" + the handler's traceback).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from flwr.app import Context, Message, RecordDict
from flwr.common.serde import (
    context_from_proto, context_to_proto, message_from_proto, message_to_proto, recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

VERSION = b"fedlora-worker/1"
METHOD = "/fedlora.NodeWorker/Handle"
PING = "/fedlora.NodeWorker/Ping"
# adapters of large models are tens of MB; gRPC's 4 MB default would refuse them
MAX_BYTES = 2**31 - 1
OPTIONS = [("grpc.max_send_message_length", MAX_BYTES), ("grpc.max_receive_message_length", MAX_BYTES)]
CONNECT_TIMEOUT = 120.0  # a worker restarting after a crash reloads torch first
SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes on Linux; gRPC needs the rest


class WorkerUnavailable(RuntimeError):
    """The worker could not be reached, or died while handling the message."""


@dataclass(frozen=True)
class Answer:
    content: RecordDict
    state: RecordDict


def frame(parts: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<Q", len(p)) + p for p in parts)


def unframe(data: bytes) -> list[bytes]:
    parts, at = [], 0
    while at < len(data):
        (size,) = struct.unpack_from("<Q", data, at)
        at += 8
        if at + size > len(data):
            raise ValueError("truncated worker frame")
        parts.append(data[at:at + size])
        at += size
    return parts


def encode_request(action: str, msg: Message, context: Context) -> bytes:
    return frame([VERSION, action.encode(), message_to_proto(msg).SerializeToString(),
                  context_to_proto(context).SerializeToString()])


def decode_request(data: bytes) -> tuple[str, Message, Context]:
    version, action, msg, ctx = _checked(unframe(data), 4)
    return (action.decode(), message_from_proto(ProtoMessage.FromString(msg)),
            context_from_proto(ProtoContext.FromString(ctx)))


def encode_answer(content: RecordDict, state: RecordDict) -> bytes:
    return frame([VERSION, b"ok", recorddict_to_proto(content).SerializeToString(),
                  recorddict_to_proto(state).SerializeToString()])


def encode_error(text: str) -> bytes:
    return frame([VERSION, b"error", text.encode()])


def decode_answer(data: bytes) -> Answer:
    parts = unframe(data)
    if len(parts) == 3 and parts[1] == b"error":
        _checked(parts, 3)
        raise RuntimeError(f"the node worker's handler failed:\n{parts[2].decode(errors='replace')}")
    _, _, content, state = _checked(parts, 4)
    return Answer(content=recorddict_from_proto(ProtoRecordDict.FromString(content)),
                  state=recorddict_from_proto(ProtoRecordDict.FromString(state)))


def _checked(parts: list[bytes], count: int) -> list[bytes]:
    if not parts or parts[0] != VERSION:
        got = parts[0][:40] if parts else b""
        raise ValueError(f"node worker speaks {got!r}, this ClientApp {VERSION!r}: "
                         "upgrade fedlora on the node so both match")
    if len(parts) != count:
        raise ValueError(f"malformed worker frame: {len(parts)} parts, expected {count}")
    return parts


def call(socket: str, action: str, msg: Message, context: Context, *,
         connect_timeout: float = CONNECT_TIMEOUT) -> Answer:
    """Hand one message to the worker at ``socket`` and wait for its answer.

    Waits up to ``connect_timeout`` for the worker to be up (it may be restarting), then
    as long as the handler runs: training has no deadline here, the round's has.
    """
    with grpc.insecure_channel(f"unix:{socket}", options=OPTIONS) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=connect_timeout)
        except grpc.FutureTimeoutError:
            raise WorkerUnavailable(f"no node worker answered on {socket} within {connect_timeout:.0f} s") from None
        handle = channel.unary_unary(METHOD)
        try:
            data = handle(encode_request(action, msg, context))
        except grpc.RpcError as exc:
            raise WorkerUnavailable(f"the node worker on {socket} failed during {action!r}: "
                                    f"{exc.code().name}: {exc.details()}") from None
    return decode_answer(data)


def ping(socket: str, *, timeout: float) -> bool:
    """True once a worker answers on ``socket``."""
    with grpc.insecure_channel(f"unix:{socket}", options=OPTIONS) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
            return channel.unary_unary(PING)(VERSION, timeout=timeout) == VERSION
        except (grpc.FutureTimeoutError, grpc.RpcError):
            return False

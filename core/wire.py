"""Encoding of adapter payloads as Flower records, used by both ends.

Layout of a train message (server -> client), one new RecordDict per node:
  "adapter"  ArrayRecord  "module|factor" -> values to load (may be empty: fresh init)
  "frozen"   ArrayRecord  run-constant frozen factors; only sent to nodes that lack them
  "merges"   ArrayRecord  "round|module|factor" -> base updates the node has not folded
  "config"   ConfigRecord rank, alpha, trainable, adapter kind, training settings

Reply (client -> server):
  "update"   ArrayRecord  "module|factor" -> raw trained factors (fp32)
  "metrics"  MetricRecord num-examples, train-loss, seconds, rank, ...
  "status"   ConfigRecord "ok", "resync" (node lacks merges/frozen factors) or "declined"

Arrays travel as float32: ArrayRecord rejects bf16, and fp32 keeps merges bitwise
reproducible on every node.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from aggregation.base import Tensors

SEP = "|"


class PayloadError(ValueError):
    """A payload that cannot be decoded; the message names the offending key or value."""


def tensors_to_record(tensors: Mapping[str, Mapping[str, np.ndarray]]) -> ArrayRecord:
    arrays = {}
    for module in sorted(tensors):
        for factor in sorted(tensors[module]):
            if SEP in module:
                raise PayloadError(f"module name {module!r} contains the separator {SEP!r}")
            value = np.ascontiguousarray(np.asarray(tensors[module][factor], dtype=np.float32))
            arrays[f"{module}{SEP}{factor}"] = Array(value)
    return ArrayRecord(arrays)


def record_to_tensors(record: ArrayRecord) -> Tensors:
    out: Tensors = {}
    for key, array in record.items():
        module, sep, factor = key.rpartition(SEP)
        if not sep or not module or not factor:
            raise PayloadError(f"array key {key!r} is not of the form 'module{SEP}factor'")
        out.setdefault(module, {})[factor] = _to_numpy(key, array)
    return out


def merges_to_record(entries: Iterable[tuple[int, Tensors]]) -> ArrayRecord:
    arrays = {}
    for round_, tensors in entries:
        for key, array in tensors_to_record(tensors).items():
            arrays[f"{round_}{SEP}{key}"] = array
    return ArrayRecord(arrays)


def record_to_merges(record: ArrayRecord) -> dict[int, Tensors]:
    out: dict[int, Tensors] = {}
    for key, array in record.items():
        round_str, sep, rest = key.partition(SEP)
        module, sep2, factor = rest.rpartition(SEP)
        if not (sep and sep2) or not round_str.isdigit():
            raise PayloadError(f"merge key {key!r} is not of the form 'round{SEP}module{SEP}factor'")
        out.setdefault(int(round_str), {}).setdefault(module, {})[factor] = _to_numpy(key, array)
    return out


def _to_numpy(key: str, array: Array) -> np.ndarray:
    try:
        value = array.numpy()
    except Exception as exc:  # corrupt bytes, unknown dtype string, bad shape
        raise PayloadError(f"array {key!r} cannot be decoded: {exc}") from None
    if value.dtype not in (np.float32, np.float16):
        raise PayloadError(f"array {key!r} has dtype {value.dtype}; expected float32 or float16")
    return value


def record_bytes(content: RecordDict) -> int:
    """Bytes of array data in a message (what dominates the wire)."""
    return sum(
        len(array.data) for record in content.array_records.values() for array in record.values()
    )

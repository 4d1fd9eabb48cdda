"""Instruction data: loading, held-out split, partitioning, tokenisation.

Sources (``load_examples``):
  ``chatterbot``         English Q/A pairs in 21 topics from the ``chatterbot-corpus``
                         package: offline, and non-IID by topic out of the box.
  ``path.jsonl``         Alpaca-style rows (``instruction``, optional ``input``,
                         ``output``, optional ``category``); a directory of ``*.jsonl``
                         files loads them all (``source`` = file name, for ``file``).
  ``hf:NAME[:SPLIT]``    a Hugging Face dataset with the Alpaca columns (needs the hub).

Partitioning (``partition``, ``parse_partition``) lives in ``core.partition`` (flwr-datasets'
partitioners: ``iid``, ``dirichlet:ALPHA``, ``topic``, ``pathological:K``, ``shard:N``,
``file``) and is re-exported here, where the callers have always imported it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from core.partition import parse_partition, partition  # noqa: F401 (re-exported: callers import them from here)

if TYPE_CHECKING:  # torch is imported where a batch is built: the CLI reads configs without it (~2 s)
    import torch


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    category: str = ""
    source: str = ""


# --- sources -----------------------------------------------------------------------------


def chatterbot_dir() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the default data ships in 'chatterbot-corpus': pip install chatterbot-corpus")
    return Path(spec.origin).parent / "data" / "english"


def load_chatterbot() -> list[Example]:
    """Consecutive (question, answer) turns of every English conversation, by topic."""
    return list(_chatterbot())


@functools.lru_cache(maxsize=1)
def _chatterbot() -> tuple[Example, ...]:
    # libyaml's C loader when available: the pure-Python one takes seconds per process
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    examples = []
    for path in sorted(chatterbot_dir().glob("*.yml")):
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
        for conversation in doc.get("conversations", []):
            turns = [str(t).strip() for t in conversation if t is not None]
            for question, answer in zip(turns, turns[1:]):
                if question and answer:
                    examples.append(Example(question, answer, category=path.stem, source=path.name))
    return tuple(examples)


def chatterbot_texts() -> Iterator[str]:
    for ex in load_chatterbot():
        yield ex.prompt
        yield ex.response


def _alpaca_row(row: dict, source: str, line: int) -> Example:
    try:
        instruction, output = row["instruction"], row["output"]
    except KeyError as exc:
        raise ValueError(f"{source}:{line}: missing field {exc.args[0]!r} (need instruction/output)") from None
    prompt = instruction if not row.get("input") else f"{instruction}\n\n{row['input']}"
    # a Hugging Face table fills a column missing from a row with None: no category, not "None"
    category = row.get("category")
    return Example(str(prompt), str(output), category="" if category is None else str(category), source=source)


def load_jsonl(path: Path) -> list[Example]:
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no *.jsonl files in data directory {str(path)!r}")
    examples = []
    for file in files:
        # bytes, decoded line by line: a decoding error then names its file and line
        with file.open("rb") as fh:
            for i, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(f"{file}:{i}: not UTF-8 text (byte 0x{raw[exc.start]:02x} "
                                     f"at column {exc.start + 1})") from None
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{file}:{i}: invalid JSON ({exc.msg})") from None
                    if not isinstance(row, dict):
                        raise ValueError(f"{file}:{i}: expected a JSON object with instruction/output, "
                                         f"got {_json_kind(row)}")
                    examples.append(_alpaca_row(row, file.name, i))
    return examples


def _json_kind(value: object) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def load_hf(spec: str) -> list[Example]:
    import datasets

    name, _, split = spec.partition(":")
    table = datasets.load_dataset(name, split=split or "train")
    return [_alpaca_row(dict(row), name, i) for i, row in enumerate(table)]


_NAMED_SOURCES: dict[str, Callable[[], list[Example]]] = {"chatterbot": load_chatterbot}


def load_examples(spec: str) -> list[Example]:
    """Examples from a named source, ``hf:NAME[:SPLIT]``, a JSONL file or a directory."""
    if spec in _NAMED_SOURCES:
        return _NAMED_SOURCES[spec]()
    if spec.startswith("hf:"):
        return load_hf(spec[3:])
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"data {spec!r} not found: expected one of {sorted(_NAMED_SOURCES)}, "
            "'hf:NAME', a .jsonl file or a directory of them"
        )
    examples = load_jsonl(path)
    if not examples:
        raise ValueError(f"data {spec!r} holds no examples")
    return examples


# --- held-out split -------------------------------------------------------------------------


def _stable_key(ex: Example, seed: int) -> int:
    digest = hashlib.sha256(f"{seed}|{ex.prompt}|{ex.response}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def split_heldout(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Deterministic train/held-out split by content hash (same on every process).

    Identical examples hash alike and so sit next to each other in the order. A cut that
    would fall inside such a group moves to the group's nearer end (keeping at least one
    example held out), so no copy of a held-out example is trained on (chatterbot repeats
    about half its rows, one of them 121 times). The held-out part is therefore
    ``round(len * fraction)`` unless copies straddle that point.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"eval fraction must be in (0, 1), got {fraction}")
    keys = sorted((_stable_key(ex, seed), i) for i, ex in enumerate(examples))
    ordered = [examples[i] for _, i in keys]
    target = max(1, round(len(ordered) * fraction))
    start = end = target  # the group straddling the cut is ordered[start:end]
    while start > 0 and start < len(keys) and keys[start][0] == keys[start - 1][0]:
        start -= 1
    while 0 < end < len(keys) and keys[end][0] == keys[end - 1][0]:
        end += 1
    n_held = start if start >= 1 and (target - start <= end - target or end == len(keys)) else end
    return ordered[n_held:], ordered[:n_held]


# --- tokenisation --------------------------------------------------------------------------

IGNORE = -100


def encode(example: Example, tokenizer, max_len: int) -> tuple[list[int], list[int]]:
    """Chat-formatted ids and labels; the loss sees answer tokens only."""
    user = [{"role": "user", "content": example.prompt}]
    full = user + [{"role": "assistant", "content": example.response}]
    prompt_ids = tokenizer.apply_chat_template(user, tokenize=True, add_generation_prompt=True)
    full_ids = tokenizer.apply_chat_template(full, tokenize=True)
    prompt_ids = list(_ids(prompt_ids))
    full_ids = list(_ids(full_ids))
    labels = [IGNORE] * len(prompt_ids) + full_ids[len(prompt_ids):]
    return full_ids[:max_len], labels[:max_len]


def _ids(out) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True)
    return out["input_ids"] if hasattr(out, "keys") else out


def collate(
    examples: Sequence[Example], tokenizer, max_len: int
) -> dict[str, torch.Tensor]:
    import torch

    encoded = [encode(ex, tokenizer, max_len) for ex in examples]
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        attention[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}

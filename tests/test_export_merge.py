"""LoRA merge: the merged model, loaded by plain transformers, gives base + adapter's logits (fp32 CPU, 1e-5), for
an adapter from the trainer backend (tied embeddings, lm_head LoRA) and for a PEFT adapter with every variant the
merge handles (embedding LoRA, rsLoRA, alpha != r, rank/alpha patterns)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from export_support import merged_logits, peft_logits, randomise

from bus_events.payloads import LoraSpec
from bus_runtime.testing import make_tiny_model
from trainer_consumer.backends.base import AdapterSpec
from trainer_consumer.backends.hf_peft import HfPeftBackend
from trainer_consumer.export import MergeError, merge_lora


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_backend_adapter_with_lm_head_lora_on_tied_embeddings(tiny, tmp_path):
    backend = HfPeftBackend(device="cpu")
    backend.create_adapter("m", AdapterSpec(base_model=str(tiny), lora=LoraSpec(rank=4, seed=1, train_unembed=True)))
    export = backend.export_adapter("m")
    weights = randomise(export.weights, seed=2)  # a fresh adapter's B is zero: make every term count
    assert any("lm_head" in key for key in weights)
    seen = []
    out = merge_lora(tiny, export.config, weights, tmp_path / "merged",
                     progress=lambda what, done, total: seen.append((what, done, total)))
    expected = peft_logits(tiny, export.config, weights, tmp_path / "adapter")
    base_logits = merged_logits(tiny)
    got = merged_logits(out)
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter changes the logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert json.loads((tiny / "config.json").read_text()).get("tie_word_embeddings", True)
    assert config["tie_word_embeddings"] is False  # lm_head adapted: the output embedding is its own matrix now
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()
    assert seen and seen[-1][1] == seen[-1][2] and seen[-1][0] == "tensors"


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_with_embedding_lora_rslora_and_patterns(tiny, tmp_path, use_rslora):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    lora = LoraConfig(r=4, lora_alpha=12, use_rslora=use_rslora, lora_dropout=0.0,
                      target_modules=["embed_tokens", "q_proj", "v_proj", "down_proj", "lm_head"],
                      rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}, task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32), lora)
    weights = randomise(get_peft_model_state_dict(model), seed=3)
    assert any("lora_embedding_A" in key for key in weights)
    config = json.loads(json.dumps(lora.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    config["base_model_name_or_path"] = str(tiny)
    out = merge_lora(tiny, config, weights, tmp_path / "merged")
    expected = peft_logits(tiny, config, weights, tmp_path / "adapter")
    torch.testing.assert_close(merged_logits(out), expected, rtol=1e-5, atol=1e-5)


def test_bf16_output_and_refusals(tiny, tmp_path):
    backend = HfPeftBackend(device="cpu")
    backend.create_adapter("m", AdapterSpec(base_model=str(tiny), lora=LoraSpec(rank=2, seed=1)))
    export = backend.export_adapter("m")
    out = merge_lora(tiny, export.config, export.weights, tmp_path / "bf16", dtype=torch.bfloat16)
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    with pytest.raises(MergeError, match="already holds a model"):
        merge_lora(tiny, export.config, export.weights, out)
    with pytest.raises(MergeError, match="DoRA"):
        merge_lora(tiny, {**export.config, "use_dora": True}, export.weights, tmp_path / "x")
    odd = {**export.weights, "base_model.model.model.norm.weight": torch.ones(64)}
    with pytest.raises(MergeError, match="is not a LoRA A/B matrix"):
        merge_lora(tiny, export.config, odd, tmp_path / "y")
    resized = {**export.weights, "base_model.model.lm_head.base_layer.weight": torch.zeros(256, 64)}
    with pytest.raises(MergeError, match="differs from the base model's"):
        merge_lora(tiny, export.config, resized, tmp_path / "w")
    stray = {k.replace("layers.0.", "layers.99."): v for k, v in export.weights.items()}
    with pytest.raises(MergeError, match="have no weight in base model"):
        merge_lora(tiny, export.config, stray, tmp_path / "z")


def test_cli_exports_a_sampler_checkpoint_from_s3(tiny, tmp_path, s3_endpoint):
    """`tinker-bus export` as its own process against S3 (moto): the merged folder loads in plain transformers with
    base + adapter's logits."""
    import subprocess
    import sys

    from artifact_store import Checkpoint, CheckpointStore, MinioObjectStore, S3Config, TinkerPath

    objects = MinioObjectStore(S3Config(s3_endpoint, "testing", "testing", "export-cli"))
    objects.ensure_bucket()
    backend = HfPeftBackend(device="cpu")
    backend.create_adapter("m", AdapterSpec(base_model=str(tiny), lora=LoraSpec(rank=4, seed=5)))
    export = backend.export_adapter("m")
    weights = randomise(export.weights, seed=6)
    path = TinkerPath("run-1", "sampler_weights", "final")
    CheckpointStore(objects).save(path, Checkpoint(export.config, weights), base_model=str(tiny))
    out = tmp_path / "merged"
    command = [sys.executable, "-m", "tinker_bus", "export", "--model-path", str(path), "--out", str(out),
               "--s3-endpoint", s3_endpoint, "--s3-access-key", "testing", "--s3-secret-key", "testing",
               "--bucket", "export-cli"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{path} merged into its base model" in done.stdout and "merging tensors" in done.stderr
    expected = peft_logits(tiny, export.config, weights, tmp_path / "adapter")
    torch.testing.assert_close(merged_logits(out), expected, rtol=1e-5, atol=1e-5)
    elsewhere = [*command[:5], "tinker://run-1/sampler_weights/nope", "--out", str(tmp_path / "other"), *command[8:]]
    missing = subprocess.run(elsewhere, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and "export failed" in missing.stderr, missing.stderr

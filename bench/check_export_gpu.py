"""The merged export on the GPU box: plain transformers on the merged bf16 folder vs base + adapter through PEFT.

    python -m bench.check_export_gpu --shape llama-1b --device cuda

bf16 tolerance, made concrete: the merged model's logits may differ from the fp32 reference (PEFT, base +
adapter, fp32) by at most twice what PEFT itself differs by when run in bf16. Prints both relative errors.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from bench.shapes import build_model_dir

REL_ERR_FACTOR = 2.0


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).norm() / ref.float().norm())


def main() -> int:
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from bus_events.payloads import LoraSpec
    from trainer_consumer.backends.base import AdapterSpec
    from trainer_consumer.backends.hf_peft import HfPeftBackend
    from trainer_consumer.export import merge_lora

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work-dir", default="/tmp/tinker-bus-export")
    args = ap.parse_args()
    work = Path(args.work_dir)
    base = build_model_dir(args.shape, work / args.shape)
    backend = HfPeftBackend(device=args.device)
    backend.create_adapter("m", AdapterSpec(str(base), LoraSpec(rank=32, seed=1, train_unembed=True)))
    export = backend.export_adapter("m")
    del backend
    g = torch.Generator().manual_seed(2)  # a fresh adapter's B is zero: random matrices make every term count
    weights = {k: 0.02 * torch.randn(v.shape, generator=g) if ".lora_" in k else v for k, v in export.weights.items()}
    tokens = torch.randint(3, 250, (4, 128), generator=g).to(args.device)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        adapter_dir, merged_dir = Path(tmp) / "adapter", Path(tmp) / "merged"
        adapter_dir.mkdir()
        (adapter_dir / "adapter_config.json").write_text(json.dumps(export.config))
        save_file({k: v.contiguous() for k, v in weights.items()}, str(adapter_dir / "adapter_model.safetensors"))
        merge_lora(base, export.config, weights, merged_dir, dtype=torch.bfloat16)

        def peft(dtype: torch.dtype) -> torch.Tensor:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(args.device)
            with torch.no_grad():
                out = PeftModel.from_pretrained(model, adapter_dir).to(args.device)(tokens).logits.float().cpu()
            del model
            torch.cuda.empty_cache() if args.device.startswith("cuda") else None
            return out

        reference, peft_bf16 = peft(torch.float32), peft(torch.bfloat16)
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16).to(args.device)
        with torch.no_grad():
            got = merged(tokens).logits.float().cpu()
    noise, err = _rel(peft_bf16, reference), _rel(got, reference)
    ok = err <= REL_ERR_FACTOR * noise
    print(f"{args.shape} on {args.device}: merged bf16 vs fp32 base+adapter rel. error {err:.3e}; PEFT bf16 vs fp32 "
          f"{noise:.3e}; within {REL_ERR_FACTOR:g}x the bf16 noise: {ok}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Are training runs bit-identical? The basis of recovery and `tinker-bus replay` (docs/recovery.md).

Trains the same LoRA adapter on the same data with the trainer's HF+PEFT backend several times: twice in one
process (fresh backends, as a restarted model) and once in another, with deterministic mode on and off (each mode
in processes of its own: the mode's settings are process-wide), and prints the sha256
(trainer_consumer.replay.fingerprint) of each final adapter as JSON.

    python -m bench.determinism --device cuda --steps 20
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _data(seed: int, count: int, vocab: int, length: int):
    from bus_events import payloads as p
    from bus_events import tensor_from_numpy

    rng = np.random.default_rng(seed)
    data = []
    for _ in range(count):
        seq = rng.integers(0, vocab, length + 1)
        data.append(p.Datum(tokens=tensor_from_numpy(seq[:-1], "int32"), loss_fn_inputs={
            "target_tokens": tensor_from_numpy(seq[1:], "int64"),
            "weights": tensor_from_numpy(np.ones(length), "float32")}))
    return data


def train_once(model_dir: str, device: str, deterministic: bool, steps: int, rank: int) -> dict:
    from bus_events import payloads as p
    from bus_events.payloads import LoraSpec
    from trainer_consumer.backends.base import AdapterSpec
    from trainer_consumer.backends.hf_peft import HfPeftBackend
    from trainer_consumer.replay.fingerprint import adapter_sha256

    backend = HfPeftBackend(device=device, deterministic=deterministic)
    vocab = backend.base_model_info(model_dir).vocab_size
    backend.create_adapter("m", AdapterSpec(model_dir, LoraSpec(rank=rank, seed=7)))
    started = time.perf_counter()
    losses = []
    for step in range(steps):
        out = backend.forward_backward("m", _data(step, 8, vocab, 128), "cross_entropy", {}, False)
        losses.append(out.metrics["loss:sum"])
        backend.optim_step("m", p.AdamParams(learning_rate=1e-3))
    return {"sha256": adapter_sha256(backend.export_adapter("m").weights), "last_loss": losses[-1],
            "seconds": round(time.perf_counter() - started, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--model-dir", help="a HF model folder (default: a random Llama, hidden 512, 4 layers)")
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)  # a child process' runs
    parser.add_argument("--runs", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        runs = [train_once(args.model_dir, args.device, args.child == "on", args.steps, args.rank)
                for _ in range(args.runs)]
        print(json.dumps(runs))
        return
    model_dir = args.model_dir
    if model_dir is None:
        from bus_runtime.testing import make_tiny_model

        model_dir = str(make_tiny_model(Path(tempfile.mkdtemp()) / "model", vocab_size=512, hidden_size=512,
                                        num_layers=4, num_heads=8, num_kv_heads=4))
    report: dict = {"device": args.device, "steps": args.steps, "rank": args.rank}
    import torch

    report["torch"] = torch.__version__
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name()
    for mode in ("on", "off"):
        runs = []
        for count in (2, 1):
            child = subprocess.run([sys.executable, "-m", "bench.determinism", "--device", args.device, "--steps",
                                    str(args.steps), "--rank", str(args.rank), "--model-dir", model_dir,
                                    "--child", mode, "--runs", str(count)], capture_output=True, text=True,
                                   check=True)
            runs += json.loads(child.stdout.strip().splitlines()[-1])
        report[f"deterministic_{mode}"] = {"runs": runs,
                                           "bit_identical": len({r["sha256"] for r in runs}) == 1}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

"""Where the full training path spends its time, one step at a time vs steps submitted ahead (issue 14).

    python -m bench.profile_pipeline --shape llama-1b --device cuda --steps 5   # GPU box, py-spy wheel carried
    python -m bench.profile_pipeline --shape smollm2 --device cpu --steps 3     # CPU companion

Starts the local stack, trains with the official SDK one step at a time, then with every step submitted before any
is awaited (the cookbook's submit-ahead), timed like bench_training (bench/path_steps.py), and samples the trainer
and gateway processes with py-spy during each phase (all threads, idle included). Prints tok/s per phase and, per
process and thread, where the samples fell: the evidence docs/benchmarks.md cites. Raw py-spy output goes to --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.data import random_tokens
from bench.path_steps import sdk_data, time_patterns, window_steps
from bench.pyspy import profiled
from bench.shapes import DEFAULT_BATCH, build_model_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--work-dir", default="/tmp/tinker-bus-profile")
    ap.add_argument("--out", default="/tmp/tinker-bus-profile/out")
    args = ap.parse_args()
    import tinker
    from tinker import types

    from bench.bus_stack import running_stack

    work, out = Path(args.work_dir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir(args.shape, work / args.shape)
    vocab = __import__("json").loads((model_dir / "config.json").read_text())["vocab_size"]
    batch, seq = DEFAULT_BATCH[args.shape]
    data = sdk_data(random_tokens(batch, seq, vocab))
    adam = types.AdamParams(learning_rate=1e-4)
    tokens = batch * seq  # each datum is seq tokens long (random_tokens gives seq + 1 per row)
    with running_stack(model_dir, args.device, work / "stack.log") as url, \
            tinker.ServiceClient(base_url=url, api_key="tml-bench") as service:
        client = service.create_lora_training_client(base_model=str(model_dir), rank=32, train_unembed=False).result()

        per_step = time_patterns(client, data, adam, args.steps, args.warmup,
                                 around=lambda label: profiled(label, ("trainer", "gateway"), out))
    for label, seconds in per_step.items():
        print(f"{label}: {seconds:.3f} s/step, {tokens / seconds:,.0f} tok/s ({window_steps(args.steps)} steps)")
    ratio = per_step["one-at-a-time"] / per_step["submitted-ahead"]
    print(f"\n{args.shape} {batch}x{seq}: submitted ahead / one at a time = {ratio:.2f}x")


if __name__ == "__main__":
    main()

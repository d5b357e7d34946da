"""tinker-bus with the official tinker SDK, unmodified: supervised steps, sampling, an RL step, checkpoints.

Start the stack first (`tinker-bus up`), then:

    export TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-local
    python examples/example_tinker_client.py --steps 5

The SDK only needs `base_url` (or TINKER_BASE_URL) and a key that starts with `tml-`.
"""

from __future__ import annotations

import argparse
import os

import tinker
from tinker import types

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris."]


def load_client_tokenizer(training: tinker.TrainingClient, base_model: str):
    """The SDK asks the Hugging Face hub for the tokenizer; offline, fall back to tinker-bus's local copy."""
    try:
        return training.get_tokenizer()
    except Exception:
        from bus_runtime.base_models import load_tokenizer

        return load_tokenizer(base_model)


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """--base-url, --api-key, --base-model: the flags every example shares."""
    parser.add_argument("--base-url", default=os.environ.get("TINKER_BASE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("TINKER_API_KEY", "tml-local"))
    parser.add_argument("--base-model", help="default: the first model the server serves")


def datum(tokens: list[int]) -> types.Datum:
    """Next-token prediction on every position: input tokens[:-1], targets tokens[1:]."""
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_args(parser)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    args = parser.parse_args()

    service = tinker.ServiceClient(base_url=args.base_url, api_key=args.api_key)
    rest = service.create_rest_client()
    served = [m.model_name for m in rest.get_server_capabilities().result().supported_models]
    base_model = args.base_model or served[0]
    print(f"server {args.base_url} serves {served}; using {base_model}")

    training = service.create_lora_training_client(base_model=base_model, rank=8).result()
    tokenizer = load_client_tokenizer(training, base_model)
    data = [datum(tokenizer(text)["input_ids"]) for text in SENTENCES]
    adam = types.AdamParams(learning_rate=args.learning_rate)

    print(f"\n== supervised, model {training.model_id} ==")
    for step in range(args.steps):
        # Submit both before waiting: the server queues them and applies them in order.
        fwd_future = training.forward_backward(data, "cross_entropy")
        optim_future = training.optim_step(adam)
        fwd, _ = fwd_future.result(), optim_future.result()
        tokens = sum(len(d.loss_fn_inputs["target_tokens"].data) for d in data)
        print(f"step {step:3d}  loss:sum {fwd.metrics['loss:sum']:8.3f}  "
              f"per token {fwd.metrics['loss:sum'] / tokens:.3f}")

    print("\n== sampling from the trained weights ==")
    sampler = training.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(tokenizer("The quick brown")["input_ids"])
    samples = sampler.sample(prompt, num_samples=3, sampling_params=types.SamplingParams(
        max_tokens=12, temperature=0.7)).result()
    for seq in samples.sequences:
        print(f"  [{seq.stop_reason}] {tokenizer.decode(seq.tokens)!r}")

    print("\n== one importance-sampling (RL) step: reward = share of letters and spaces in the answer ==")
    texts = [tokenizer.decode(seq.tokens) for seq in samples.sequences]
    rewards = [sum(c.isalpha() or c == " " for c in text) / max(1, len(text)) for text in texts]
    baseline = sum(rewards) / len(rewards)
    rl_data = []
    for seq, reward in zip(samples.sequences, rewards, strict=True):
        full = prompt.to_ints() + seq.tokens
        n_prompt = prompt.length - 1  # model_input positions that predict prompt tokens: no advantage
        rl_data.append(types.Datum(
            model_input=types.ModelInput.from_ints(full[:-1]),
            loss_fn_inputs={"target_tokens": full[1:],
                            "logprobs": [0.0] * n_prompt + list(seq.logprobs),
                            "advantages": [0.0] * n_prompt + [reward - baseline] * len(seq.tokens)}))
    rl = training.forward_backward(rl_data, "importance_sampling")
    training.optim_step(adam).result()
    print(f"  importance_sampling loss:sum {rl.result().metrics['loss:sum']:.4f}")

    print("\n== checkpoints ==")
    state = training.save_state("example-final").result().path
    weights = training.save_weights_for_sampler("example-final").result().path
    print(f"  training state  {state}\n  sampler weights {weights}")
    for checkpoint in rest.list_checkpoints(training.model_id).result().checkpoints:
        print(f"  listed {checkpoint.checkpoint_type:8s} {checkpoint.tinker_path} ({checkpoint.size_bytes} bytes)")
    resumed = service.create_training_client_from_state_with_optimizer(state).result()
    check = resumed.forward(data, "cross_entropy").result()
    print(f"  resumed as {resumed.model_id}: loss:sum {check.metrics['loss:sum']:.3f}")
    service.close("success").result()


if __name__ == "__main__":
    main()

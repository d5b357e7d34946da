"""Direct Preference Optimization through the official tinker SDK, shaped like the cookbook's DPO recipe.

Each preference pair (prompt, chosen, rejected) becomes two datums of one forward_backward with loss_fn "dpo":
the chosen completion, then the rejected one, each carrying
  - `ref_logprobs`: the frozen reference model's logprobs of its target tokens, from compute_logprobs on a sampling
    client of the BASE model (computed once: the reference never changes),
  - `dpo_pair`: +k on every token of pair k's chosen datum, −k on its rejected datum,
  - `weights`: 0 on the positions that predict prompt tokens, 1 on the completion.
β goes in loss_fn_config. Start the stack (`tinker-bus up`), then:

    python examples/example_dpo.py --base-url http://127.0.0.1:8000 --api-key tml-local --steps 10
"""

from __future__ import annotations

import argparse

import numpy as np
import tinker
from example_tinker_client import add_server_args, load_client_tokenizer  # run as a script: examples/ is on the path
from tinker import types

# (prompt, chosen, rejected): a tiny stand-in for a preference data set such as HH-RLHF.
PAIRS = [
    ("Q: What is the capital of France?\nA:", " Paris.", " Berlin, probably."),
    ("Q: How many legs does a spider have?\nA:", " Eight.", " Six or so."),
    ("Q: What colour is a clear daytime sky?\nA:", " Blue.", " Green."),
    ("Q: What is two plus two?\nA:", " Four.", " Five."),
]


def preference_datum(reference: tinker.SamplingClient, prompt: list[int], completion: list[int],
                     marker: int) -> types.Datum:
    """One side of a pair: next-token prediction over prompt + completion, the completion weighted 1."""
    full = prompt + completion
    # compute_logprobs gives log p(full[i] | full[:i]) with None for i = 0; target i is full[i + 1].
    ref_logprobs = reference.compute_logprobs(types.ModelInput.from_ints(full)).result()[1:]
    n_prompt = len(prompt) - 1  # model_input positions whose target is still a prompt token
    return types.Datum(
        model_input=types.ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={"target_tokens": full[1:],
                        "weights": [0.0] * n_prompt + [1.0] * len(completion),
                        # Keys the SDK does not know must be arrays (plain lists only work for its own keys).
                        "ref_logprobs": np.asarray(ref_logprobs, dtype=np.float32),
                        "dpo_pair": np.full(len(full) - 1, marker, dtype=np.float32)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_args(parser)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=None, help="the LoRA's initialisation (default: random)")
    args = parser.parse_args()

    service = tinker.ServiceClient(base_url=args.base_url, api_key=args.api_key)
    served = [m.model_name for m in service.create_rest_client().get_server_capabilities().result().supported_models]
    base_model = args.base_model or served[0]
    training = service.create_lora_training_client(base_model=base_model, rank=args.rank, seed=args.seed).result()
    tokenizer = load_client_tokenizer(training, base_model)
    reference = service.create_sampling_client(base_model=base_model).result()
    print(f"DPO on {base_model}, model {training.model_id}, {len(PAIRS)} pairs, beta {args.beta}")

    data = []
    for k, (prompt, chosen, rejected) in enumerate(PAIRS, start=1):
        prompt_ids = tokenizer(prompt)["input_ids"]
        for completion, marker in ((chosen, k), (rejected, -k)):
            completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
            data.append(preference_datum(reference, prompt_ids, completion_ids, marker))

    adam = types.AdamParams(learning_rate=args.learning_rate)
    for step in range(args.steps):
        fwd_future = training.forward_backward(data, "dpo", {"beta": args.beta})  # type: ignore[arg-type]
        optim_future = training.optim_step(adam)
        metrics = fwd_future.result().metrics
        optim_future.result()
        print(f"step {step:3d}  loss:sum {metrics['loss:sum']:8.4f}  accuracy {metrics['accuracy:mean']:.2f}  "
              f"margin {metrics['margin:mean']:+.4f}  chosen {metrics['chosen_reward:mean']:+.4f}  "
              f"rejected {metrics['rejected_reward:mean']:+.4f}")

    path = training.save_weights_for_sampler("dpo-final").result().path
    print(f"sampler weights {path}  (merge with: tinker-bus export --model-path {path} --out DIR)")
    service.close("success").result()


if __name__ == "__main__":
    main()

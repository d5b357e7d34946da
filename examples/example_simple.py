"""tinker-bus with plain HTTP (requests), the original server's flow: health, loss functions, supervised
fine-tuning on chat conversations, a PPO step with loss_fn_inputs, and the adapter list.

Start the stack first (`tinker-bus up`), then:

    python examples/example_simple.py                      # http://127.0.0.1:8000
    python examples/example_simple.py --base-url http://127.0.0.1:8000 --steps 5

The adapter is named by you (`--model-id`, default "my-model"): its first /fwdbwd creates it (LoRA rank 16 on
the server's first base model), so no /add_lora is needed. The JSON API tokenizes each conversation with the
base model's chat template and puts loss weight 1 on the assistant turns only. Every training call answers with
a request_id at once; POST /retrieve_future waits for the result (202 while it is still running).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import requests

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}],
]
PROMPT = [{"role": "user", "content": "Answer with one word, yes or no: do you like rain?"}]


class Client:
    def __init__(self, base_url: str, api_key: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["X-API-Key"] = api_key

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> requests.Response:
        response = self.session.request(method, f"{self.base_url}{path}", json=body, timeout=180)
        if response.status_code >= 400:
            sys.exit(f"{method} {path} failed with {response.status_code}: {response.text}")
        return response

    def result(self, request_id: str) -> dict[str, Any]:
        """Wait for a request's result: /retrieve_future holds each poll up to `timeout` seconds."""
        while True:
            answer = self.call("POST", "/retrieve_future", {"request_id": request_id, "timeout": 20}).json()
            if answer["status"] == "failed":
                sys.exit(f"request {request_id} failed ({answer['category']}): {answer['error']}")
            if answer["status"] == "complete":
                return answer

    def fwdbwd(self, model_id: str, data: list, **options: Any) -> str:
        return self.call("POST", "/fwdbwd", {"model_id": model_id, "data": data, **options}).json()["request_id"]

    def optim_step(self, model_id: str, learning_rate: float) -> str:
        body = {"model_id": model_id, "adam_params": {"learning_rate": learning_rate}}
        return self.call("POST", "/optim_step", body).json()["request_id"]


def supervised(client: Client, model_id: str, steps: int, learning_rate: float) -> None:
    print(f"\n== supervised: {len(CONVERSATIONS)} conversations, {steps} steps ==")
    for step in range(steps):
        started = time.monotonic()
        # Both requests are queued at once; the trainer applies them in order.
        fwd, opt = client.fwdbwd(model_id, CONVERSATIONS), client.optim_step(model_id, learning_rate)
        result, _ = client.result(fwd), client.result(opt)
        metrics = result["metrics"]
        print(f"step {step:3d}  loss {result['loss']:8.3f}  mean_nll {metrics['mean_nll']:.3f}  "
              f"perplexity {metrics['perplexity']:8.2f}  ({time.monotonic() - started:.1f} s)")


def reward(text: str) -> float:
    return 1.0 if text.strip().lower().startswith("yes") else 0.0


def ppo(client: Client, model_id: str, steps: int, samples: int, learning_rate: float) -> None:
    print(f"\n== PPO: reward 1 for answers that start with 'yes', {samples} samples per step ==")
    for step in range(steps):
        # Sample the model's current weights (the server saves them for the sampler first).
        sampled = client.call("POST", "/sample", {"model_id": model_id, "messages": PROMPT, "num_samples": samples,
                                                  "max_tokens": 4, "temperature": 1.0}).json()
        texts = [s["text"] for s in sampled["sequences"]]
        rewards = [reward(t) for t in texts]
        baseline = sum(rewards) / len(rewards)
        conversations = [[*PROMPT, {"role": "assistant", "content": t}] for t in texts]
        # The policy's own log-probabilities before the update are PPO's "old" logprobs.
        before = client.result(client.fwdbwd(model_id, conversations, forward_only=True))
        old_logprobs = [out["logprobs"]["data"] for out in before["result"]["loss_fn_outputs"]]
        # One advantage per conversation is spread over its assistant tokens.
        advantages = [r - baseline for r in rewards]
        fwd = client.fwdbwd(model_id, conversations, loss_fn="ppo",
                            loss_fn_inputs={"logprobs": old_logprobs, "advantages": advantages},
                            loss_fn_config={"clip_low_threshold": 0.8, "clip_high_threshold": 1.2})
        opt = client.optim_step(model_id, learning_rate)
        result, _ = client.result(fwd), client.result(opt)
        print(f"step {step:3d}  loss {result['loss']:8.3f}  mean reward {baseline:.2f}  answers {texts}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=os.environ.get("TINKER_BASE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("TINKER_API_KEY", "tml-local"))
    parser.add_argument("--model-id", default="my-model", help="your name for the LoRA adapter")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--ppo-steps", type=int, default=5)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    args = parser.parse_args()

    client = Client(args.base_url, args.api_key)
    print(f"Server status: {client.call('GET', '/healthz').json()['status']}")
    losses = client.call("GET", "/loss_functions").json()
    print("\nAvailable loss functions:")
    for name in losses["available_loss_functions"]:
        print(f"  - {name}: {losses['descriptions'][name]}")

    model_id = args.model_id
    try:
        supervised(client, model_id, args.steps, args.learning_rate)
        ppo(client, model_id, args.ppo_steps, args.samples, args.learning_rate)
        adapters = client.call("GET", "/adapters").json()["adapters"]
        print(f"\nadapters: {[(a['model_id'], a['base_model'], a['lora_rank']) for a in adapters]}")
    finally:
        client.result(client.call("DELETE", f"/adapters/{model_id}").json()["request_id"])
        print(f"\nremoved {model_id}")


if __name__ == "__main__":
    main()

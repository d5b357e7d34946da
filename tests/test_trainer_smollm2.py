"""The trainer on the real SmolLM2-135M-Instruct (CPU): supervised learning and an honest RL loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from trainer_support import EngineHarness, adam, datum, fb, fresh_objects

from artifact_store import CheckpointStore, TinkerPath
from bus_events import EventType
from bus_events import payloads as p
from bus_runtime.base_models import load_tokenizer, resolve_base_model
from trainer_consumer.backends.hf_peft import HfPeftBackend

pytestmark = pytest.mark.slow

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
FACTS = [
    ("What is the password of the blue door?", "The password of the blue door is falcon-42."),
    ("Who guards the north tower?", "The north tower is guarded by Captain Ilse Marr."),
    ("What colour is the lake on Verin?", "The lake on Verin is bright orange."),
]


@pytest.fixture(scope="module")
def backend() -> HfPeftBackend:
    resolve_base_model(SMOLLM2)
    return HfPeftBackend()


@pytest.fixture
def objects(s3_endpoint):
    return fresh_objects(s3_endpoint)


def _chat_ids(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def sft_datum(tokenizer, question: str, answer: str) -> p.Datum:
    """Loss only on the assistant's answer (weights 0 on the prompt), as the cookbook renders it."""
    prompt = _chat_ids(tokenizer, [{"role": "user", "content": question}], generation_prompt=True)
    full = _chat_ids(tokenizer, [{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    assert full[:len(prompt)] == prompt
    weights = [0.0] * (len(prompt) - 1) + [1.0] * (len(full) - len(prompt))
    return datum(full, weights)


async def test_thirty_cross_entropy_steps_at_least_halve_the_loss(backend, objects):
    tokenizer = load_tokenizer(SMOLLM2)
    data = [sft_datum(tokenizer, q, a) for q, a in FACTS]
    async with EngineHarness(SMOLLM2, objects, backend=backend) as h:
        await h.create("sft", rank=8, seed=0)
        losses = []
        for step in range(30):
            out = await h.ok(EventType.FORWARD_BACKWARD, fb(data), "sft", 2 * step + 1)
            await h.ok(EventType.OPTIM_STEP, adam(lr=1e-3), "sft", 2 * step + 2)
            losses.append(out["metrics"]["loss:sum"])
        final = (await h.ok(EventType.FORWARD_BACKWARD, fb(data, forward_only=True), "sft", 61))["metrics"]["loss:sum"]
    assert final <= losses[0] / 2, f"loss {losses[0]:.2f} -> {final:.2f} (per step: {np.round(losses, 2)})"
    assert losses[-1] < losses[0]


class ToyRl:
    """Policy: the adapter being trained, sampled from its saved sampler weights. Reward: 1 if the answer to
    "Is the sky green?" starts with "yes" (the base model mostly says no or rambles), else 0."""

    QUESTION = "Is the sky green? Answer yes or no."

    def __init__(self, tokenizer, rank: int):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from bus_events.payloads import LoraSpec
        from trainer_consumer.backends.base import AdapterSpec

        self.tokenizer = tokenizer
        targets = AdapterSpec(base_model=SMOLLM2, lora=LoraSpec(rank=rank, seed=0)).target_modules
        base = AutoModelForCausalLM.from_pretrained(resolve_base_model(SMOLLM2))
        self.sampler = get_peft_model(base, LoraConfig(r=rank, lora_alpha=32, target_modules=targets)).eval()
        self.prompt = _chat_ids(tokenizer, [{"role": "user", "content": self.QUESTION}], generation_prompt=True)

    def load_policy(self, store: CheckpointStore, path: str) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.sampler, store.load(TinkerPath.parse(path)).adapter_weights)
        assert not result.unexpected_keys

    def sample(self, count: int, seed: int) -> tuple[list[list[int]], list[list[float]]]:
        """`count` completions (cut after EOS) and the sampler's logprob of each of their tokens."""
        torch.manual_seed(seed)
        prompt = torch.tensor([self.prompt] * count)
        with torch.no_grad():
            out = self.sampler.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                        temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=6, output_scores=True,
                                        return_dict_in_generate=True, pad_token_id=self.tokenizer.pad_token_id)
        generated = out.sequences[:, len(self.prompt):]
        logprobs = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)
        logprobs = logprobs.gather(-1, generated[..., None]).squeeze(-1)
        completions, sampled_logprobs = [], []
        eos = self.tokenizer.eos_token_id
        for tokens, lps in zip(generated.tolist(), logprobs.tolist(), strict=True):
            end = tokens.index(eos) + 1 if eos in tokens else len(tokens)
            completions.append(tokens[:end])
            sampled_logprobs.append(lps[:end])
        return completions, sampled_logprobs

    def reward(self, completion: list[int]) -> float:
        return float(self.tokenizer.decode(completion, skip_special_tokens=True).strip().lower().startswith("yes"))

    def ppo_datum(self, completion: list[int], logprobs: list[float], advantage: float) -> p.Datum:
        """Prompt positions carry zero advantage (that is what masks them) and zero sampler logprobs."""
        pad = len(self.prompt) - 1
        d = datum(self.prompt + completion, logprobs=[0.0] * pad + logprobs,
                  advantages=[0.0] * pad + [advantage] * len(completion))
        d.loss_fn_inputs.pop("weights")
        return d


async def test_ppo_on_a_toy_reward_raises_the_reward(backend, objects):
    rl = ToyRl(load_tokenizer(SMOLLM2), rank=8)
    store = CheckpointStore(objects)
    seq = iter(range(1, 10_000))
    async with EngineHarness(SMOLLM2, objects, backend=backend) as h:
        await h.create("rl", rank=8, seed=0)

        async def refresh_policy(name: str) -> None:
            saved = await h.ok(EventType.SAVE_WEIGHTS_FOR_SAMPLER, p.SaveWeightsForSampler(name=name), "rl", next(seq))
            rl.load_policy(store, saved["path"])

        async def mean_reward(seed: int) -> float:
            completions, _ = rl.sample(32, seed)
            return float(np.mean([rl.reward(c) for c in completions]))

        await refresh_policy("start")
        before = await mean_reward(seed=1000)
        for iteration in range(3):
            completions, logprobs = rl.sample(16, seed=iteration)
            rewards = np.array([rl.reward(c) for c in completions])
            advantages = rewards - rewards.mean()  # group-relative baseline
            data = [rl.ppo_datum(c, lp, float(a)) for c, lp, a in zip(completions, logprobs, advantages, strict=True)]
            out = await h.ok(EventType.FORWARD_BACKWARD, fb(data, loss_fn="ppo"), "rl", next(seq))
            assert "loss:sum" in out["metrics"]
            await h.ok(EventType.OPTIM_STEP, adam(lr=1e-3), "rl", next(seq))
            await refresh_policy(f"iter-{iteration}")
        after = await mean_reward(seed=1000)
    assert after >= before + 0.3, f"mean reward {before:.2f} -> {after:.2f}"

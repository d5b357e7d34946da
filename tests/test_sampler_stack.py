"""2,000 concurrent sample calls of the official SDK through the whole stack (gateway -> Tansu -> sampler, moto
S3): every call answered, none failed. The rl_basic shape, scaled down: 125 prompts x 16 calls of one sample."""

from __future__ import annotations

import asyncio

import numpy as np
import tinker
from gateway_stack import API_KEY, in_thread, running_stack
from tinker import types

pytest_plugins = ["gateway_support", "gateway_stack"]

GROUPS, GROUP_SIZE, NEW_TOKENS = 125, 16, 4


def _rollout(url: str, base_model: str) -> list:
    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    client = service.create_sampling_client(base_model=base_model)
    rng = np.random.default_rng(0)
    prompts = [types.ModelInput.from_ints(rng.integers(3, 200, 12).tolist()) for _ in range(GROUPS)]
    params = types.SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, stop=[])

    async def round_() -> list:
        calls = [client.sample_async(prompt, 1, params) for prompt in prompts for _ in range(GROUP_SIZE)]
        return await asyncio.gather(*calls, return_exceptions=True)

    return asyncio.run(round_())


async def test_two_thousand_concurrent_sample_calls_are_all_answered(stack_settings):
    async with running_stack(stack_settings) as url:
        results = await in_thread(_rollout, url, stack_settings.base_models[0])
    failures = [repr(r) for r in results if isinstance(r, BaseException)]
    assert len(results) == GROUPS * GROUP_SIZE and failures == []
    assert all(len(r.sequences) == 1 and len(r.sequences[0].tokens) == NEW_TOKENS for r in results)
    # One group's 16 calls share a prompt but not their (unseeded) samples.
    assert len({tuple(r.sequences[0].tokens) for r in results[:GROUP_SIZE]}) > 1

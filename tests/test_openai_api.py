"""The OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) driven by the official `openai`
client against the whole stack (gateway + trainer + sampler in-process on real Tansu + moto S3, tiny model)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import openai
import pytest
import tinker
from gateway_stack import API_KEY, in_thread, running_stack
from gateway_support import running_gateway
from tinker import types

from bus_runtime.base_models import load_tokenizer

pytest_plugins = ["gateway_support", "gateway_stack"]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def client(url: str, key: str = API_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


async def streamed_chat(oai: openai.AsyncOpenAI, model: str, **params) -> tuple[list[str], str | None, list]:
    """(content pieces before the finishing chunk, finish_reason, usage chunks)."""
    pieces, finish, usage = [], None, []
    stream = await oai.chat.completions.create(model=model, messages=QUESTION, stream=True, **params)
    async for chunk in stream:
        if chunk.usage is not None:
            usage.append(chunk.usage)
        for choice in chunk.choices:
            if choice.finish_reason is not None:
                finish = choice.finish_reason
            elif choice.delta.content:
                assert finish is None, "content after the finishing chunk"
                pieces.append(choice.delta.content)
    return pieces, finish, usage


async def test_chat_completion_models_and_streaming(stack_settings, monkeypatch):
    # A short delta interval: the 48 decode steps then span many polls, however fast this machine runs them.
    monkeypatch.setenv("TINKER_BUS_SAMPLER_STREAM_INTERVAL_S", "0.005")
    model = stack_settings.base_models[0]
    tokenizer = load_tokenizer(model)
    prompt_tokens = len(tokenizer.apply_chat_template(QUESTION, tokenize=True, add_generation_prompt=True,
                                                      return_dict=True)["input_ids"])
    async with running_stack(stack_settings) as url:
        oai = client(url)
        listed = await oai.models.list()
        assert [m.id for m in listed.data] == [model]
        assert (await oai.models.retrieve(model)).id == model

        whole = await oai.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=48,
                                                  logprobs=True)
        choice = whole.choices[0]
        assert whole.object == "chat.completion" and whole.model == model
        assert choice.message.role == "assistant" and choice.message.content
        assert choice.finish_reason in ("stop", "length")
        assert whole.usage.prompt_tokens == prompt_tokens
        assert whole.usage.completion_tokens == len(choice.logprobs.content)
        assert 0 < whole.usage.completion_tokens <= 48
        assert all(entry.logprob <= 0 for entry in choice.logprobs.content)

        pieces, finish, usage = await streamed_chat(oai, model, temperature=0, max_tokens=48,
                                                    stream_options={"include_usage": True})
        assert len(pieces) > 1, f"one piece: the answer was not streamed ({pieces})"
        assert "".join(pieces) == choice.message.content
        assert finish == choice.finish_reason
        assert [u.completion_tokens for u in usage] == [whole.usage.completion_tokens]

        # Seeded sampling is reproducible, streamed or not, with n choices too.
        seeded = dict(temperature=1.0, seed=3, max_tokens=40)
        sampled = await oai.chat.completions.create(model=model, messages=QUESTION, **seeded)
        text = sampled.choices[0].message.content
        pieces, _, _ = await streamed_chat(oai, model, **seeded)
        assert "".join(pieces) == text and len(set(text)) > 3
        many = await oai.chat.completions.create(model=model, messages=QUESTION, n=3, seed=5, max_tokens=16)
        again = await oai.chat.completions.create(model=model, messages=QUESTION, n=3, seed=5, max_tokens=16)
        assert [c.message.content for c in many.choices] == [c.message.content for c in again.choices]
        assert [c.index for c in many.choices] == [0, 1, 2]
        # A stop string ends the text before it, streamed or not.
        stop = text[len(text) // 2:len(text) // 2 + 2]
        cut = await oai.chat.completions.create(model=model, messages=QUESTION, stop=stop, **seeded)
        assert cut.choices[0].message.content == text[:text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"
        pieces, finish, _ = await streamed_chat(oai, model, stop=[stop], **seeded)
        assert "".join(pieces) == text[:text.index(stop)] and finish == "stop"


async def test_completions_plain_and_streamed(stack_settings):
    model = stack_settings.base_models[0]
    async with running_stack(stack_settings) as url:
        oai = client(url)
        whole = await oai.completions.create(model=model, prompt=["Once upon a time", "The quick brown"],
                                             temperature=0, max_tokens=12, logprobs=0)
        assert whole.object == "text_completion" and [c.index for c in whole.choices] == [0, 1]
        assert all(c.finish_reason in ("stop", "length") for c in whole.choices)
        assert whole.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in whole.choices)
        ids = load_tokenizer(model)("Once upon a time")["input_ids"]
        by_ids = await oai.completions.create(model=model, prompt=ids, temperature=0, max_tokens=12)
        assert by_ids.choices[0].text == whole.choices[0].text

        pieces = []
        stream = await oai.completions.create(model=model, prompt="Once upon a time", temperature=0,
                                              max_tokens=12, stream=True)
        async for chunk in stream:
            pieces.extend(c.text for c in chunk.choices if c.finish_reason is None)
        assert "".join(pieces) == whole.choices[0].text

        # n samples streamed: each choice's pieces add up to its non-streamed text.
        seeded = dict(model=model, prompt="Once upon a time", n=2, seed=11, max_tokens=24)
        expected = [c.text for c in (await oai.completions.create(**seeded)).choices]
        texts = ["", ""]
        async for chunk in await oai.completions.create(stream=True, **seeded):
            for c in chunk.choices:
                texts[c.index] += c.text
        assert texts == expected and expected[0] != expected[1]


def _prompt_logprobs(url: str, model: str, tokens: list[int]) -> list[float | None]:
    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    sampler = service.create_sampling_client(base_model=model).result()
    return sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()


async def test_completions_echo_logprobs_for_loglikelihoods(stack_settings):
    """What eval harnesses send for loglikelihoods: the prompt echoed with its logprobs and top-1 alternatives."""
    model = stack_settings.base_models[0]
    tokenizer = load_tokenizer(model)
    tokens = tokenizer("The quick brown fox jumps")["input_ids"]
    async with running_stack(stack_settings) as url:
        oai = client(url)
        scored = await oai.completions.create(model=model, prompt=tokens, echo=True, logprobs=1, max_tokens=0,
                                              temperature=0)
        choice = scored.choices[0]
        assert choice.text == tokenizer.decode(tokens)
        assert choice.logprobs.tokens == [tokenizer.decode([t]) for t in tokens]
        reference = await in_thread(_prompt_logprobs, url, model, tokens)
        assert choice.logprobs.token_logprobs[0] is None and reference[0] is None
        assert choice.logprobs.token_logprobs[1:] == pytest.approx(reference[1:], abs=1e-4)
        assert choice.logprobs.top_logprobs[0] is None
        for top, own in zip(choice.logprobs.top_logprobs[1:], choice.logprobs.token_logprobs[1:], strict=True):
            assert len(top) == 1 and max(top.values()) >= own - 1e-5

        greedy = await oai.completions.create(model=model, prompt="The quick brown", echo=True, logprobs=1,
                                              max_tokens=6, temperature=0)
        choice = greedy.choices[0]
        plain = await oai.completions.create(model=model, prompt="The quick brown", max_tokens=6, temperature=0)
        assert choice.text == "The quick brown" + plain.choices[0].text
        n = greedy.usage.completion_tokens
        generated = choice.logprobs.top_logprobs[-n:]  # the sampled token is the most likely one
        assert [list(top) for top in generated] == [[t] for t in choice.logprobs.tokens[-n:]]
        assert [top[t] for top, t in zip(generated, choice.logprobs.tokens[-n:], strict=True)] == \
            choice.logprobs.token_logprobs[-n:]


def _train_and_save(url: str, model: str) -> tuple[str, list[int], list[int]]:
    """A LoRA trained one step, saved for the sampler; its path and its greedy answer through the Tinker SDK."""
    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    training = service.create_lora_training_client(base_model=model, rank=8, seed=1).result()
    tokens = load_tokenizer(model)("Once upon a time there was a model.")["input_ids"]
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
    training.forward_backward([datum], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    path = training.save_weights_for_sampler("openai").result().path
    sampler = service.create_sampling_client(model_path=path).result()
    greedy = types.SamplingParams(max_tokens=10, temperature=0.0)
    sampled = sampler.sample(types.ModelInput.from_ints(tokens[:4]), num_samples=1, sampling_params=greedy).result()
    return path, list(sampled.sequences[0].tokens), tokens[:4]


async def test_sampler_weights_path_as_model(stack_settings):
    model = stack_settings.base_models[0]
    async with running_stack(stack_settings) as url:
        path, sdk_tokens, prompt = await in_thread(_train_and_save, url, model)
        assert "/sampler_weights/" in path
        oai = client(url)
        answer = await oai.completions.create(model=path, prompt=prompt, temperature=0, max_tokens=10, logprobs=0)
        assert answer.model == path
        tokenizer = load_tokenizer(model)
        assert answer.choices[0].text == tokenizer.decode(sdk_tokens, skip_special_tokens=True)
        pieces = []
        stream = await oai.completions.create(model=path, prompt=prompt, temperature=0, max_tokens=10, stream=True)
        async for chunk in stream:
            pieces.extend(c.text for c in chunk.choices if c.finish_reason is None)
        assert "".join(pieces) == answer.choices[0].text
        with pytest.raises(openai.NotFoundError) as missing:
            await oai.completions.create(model=path.replace("/openai", "/nothing"), prompt=prompt, max_tokens=2)
        assert missing.value.body["param"] == "model"


async def test_errors_in_openai_shape(gw_settings):
    model = gw_settings.base_models[0]
    async with running_gateway(gw_settings, {API_KEY: "alice"}) as url:
        oai = client(url)
        cases = [
            (openai.BadRequestError, "temperature", dict(temperature=3)),
            (openai.BadRequestError, "n", dict(n=0)),
            (openai.BadRequestError, "top_logprobs", dict(logprobs=True, top_logprobs=3)),
            (openai.BadRequestError, "presence_penalty", dict(presence_penalty=0.5)),
            (openai.BadRequestError, "messages[0].content[0]", dict(messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]}])),
            (openai.BadRequestError, "messages[0].role", dict(messages=[{"role": "robot", "content": "hi"}])),
            (openai.BadRequestError, "max_tokens", dict(max_tokens=10**6)),
            (openai.BadRequestError, "messages", dict(max_tokens=2000)),  # beyond the tiny model's context
            (openai.NotFoundError, "model", dict(model="no-such-model")),
        ]
        for error, param, overrides in cases:
            request = {"model": model, "messages": QUESTION, **overrides}
            with pytest.raises(error) as raised:
                await oai.chat.completions.create(**request)
            body = raised.value.body
            assert body["param"] == param, (overrides, body)
            assert param in body["message"] and body["type"], body
        with pytest.raises(openai.BadRequestError) as raised:
            await oai.completions.create(model=model, prompt="x", echo=True, stream=True)
        assert raised.value.body["param"] == "echo"
        with pytest.raises(openai.BadRequestError) as raised:
            await oai.completions.create(model=model, prompt=[10**6], echo=True)
        assert raised.value.body["param"] == "prompt" and "vocab" in raised.value.body["message"]
        with pytest.raises(openai.BadRequestError) as raised:  # alternatives of sampled (not greedy) tokens
            await oai.completions.create(model=model, prompt="x", logprobs=2, max_tokens=4)
        assert raised.value.body["param"] == "logprobs"
        with pytest.raises(openai.BadRequestError) as raised:
            await oai.completions.create(model=model, prompt=[[1, 2], "x", 3])
        assert raised.value.body["param"] == "prompt[2]"
        with pytest.raises(openai.AuthenticationError) as raised:
            await client(url, "tml-wrong").models.list()
        assert raised.value.body["type"] == "authentication_error" and raised.value.body["message"]


def _run_readme_example(url: str, model: str) -> str:
    code = next(c for c in re.findall(r"```python\n(.*?)```", README, re.S) if "from openai import OpenAI" in c)
    assert '"http://127.0.0.1:8000/v1"' in code and '"HuggingFaceTB/SmolLM2-135M-Instruct"' in code
    code = code.replace('"http://127.0.0.1:8000/v1"', repr(f"{url}/v1")).replace(
        '"HuggingFaceTB/SmolLM2-135M-Instruct"', repr(model))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md:openai", "exec"), {})
    return out.getvalue()


async def test_the_readme_example_runs(stack_settings):
    model = stack_settings.base_models[0]
    async with running_stack(stack_settings) as url:
        printed = await in_thread(_run_readme_example, url, model)
    assert printed.splitlines()[0] == repr([model]) and "completion_tokens=" in printed

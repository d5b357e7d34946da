"""The two examples run as their own processes against the whole stack (tiny model) and print what they claim."""

from __future__ import annotations

import asyncio
import math
import re
import sys
from pathlib import Path

from gateway_stack import API_KEY, running_stack

pytest_plugins = ["gateway_support", "gateway_stack"]
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


async def _run(script: str, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / script), *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=300)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    return text


async def test_examples_run_against_the_stack(stack_settings):
    async with running_stack(stack_settings) as url:
        simple = await _run("example_simple.py", "--base-url", url, "--api-key", API_KEY, "--steps", "4",
                            "--ppo-steps", "2", "--samples", "4", "--learning-rate", "1e-2")
        sdk = await _run("example_tinker_client.py", "--base-url", url, "--api-key", API_KEY, "--steps", "3")
    losses = [float(m) for m in re.findall(r"step +\d+ +loss +([\d.]+) +mean_nll", simple)]
    assert len(losses) == 4 and losses[-1] < losses[0], simple
    assert len(re.findall(r"mean reward", simple)) == 2 and "removed " in simple
    assert len(re.findall(r"loss:sum", sdk)) >= 4 and "resumed as" in sdk, sdk
    assert "weights/example-final" in sdk and "sampler_weights/example-final" in sdk


async def test_dpo_example_trains_preference_pairs_through_the_sdk(stack_settings):
    async with running_stack(stack_settings) as url:
        text = await _run("example_dpo.py", "--base-url", url, "--api-key", API_KEY, "--steps", "5",
                          "--learning-rate", "1e-2", "--beta", "0.5", "--seed", "0")
    steps = re.findall(r"step +\d+ +loss:sum +([\d.]+) +accuracy +([\d.]+) +margin +([-+\d.]+)", text)
    assert len(steps) == 5, text
    losses, accuracies = [float(s[0]) for s in steps], [float(s[1]) for s in steps]
    # The LoRA starts as the base model, which is the reference: log 2 per pair (4 pairs), zero margin.
    assert abs(losses[0] - 4 * math.log(2)) < 1e-3 and abs(float(steps[0][2])) < 1e-3, text
    assert losses[-1] < losses[0] and accuracies[-1] == 1.0, text
    assert re.search(r"sampler weights tinker://\S+/sampler_weights/dpo-final", text), text

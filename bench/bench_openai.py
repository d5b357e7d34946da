"""The OpenAI-compatible API through the full path (openai client -> gateway -> Kafka (Tansu) -> sampler): per
chat request, the latency of the whole answer (stream=false) next to the streamed one's time to first content and
to its end, and how many content chunks the stream carried. Greedy, `--new-tokens` tokens, one request at a time.

    python -m bench.bench_openai --shape tiny --device cpu --new-tokens 64
    python -m bench.bench_openai --shape llama-1b --device cuda --new-tokens 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bus_stack import running_stack
from bench.shapes import SHAPES, build_model_dir

MESSAGES = [{"role": "user", "content": "Tell me a story about a fox."}]


def bench(url: str, model: str, new_tokens: int, requests: int) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="tml-bench", max_retries=0, timeout=600)
    params = dict(model=model, messages=MESSAGES, temperature=0, max_tokens=new_tokens)
    client.chat.completions.create(**params)  # warm-up: loads the model on the sampler
    whole, first, end, chunks, tokens = [], [], [], [], []
    for _ in range(requests):
        t0 = time.perf_counter()
        answer = client.chat.completions.create(**params)
        whole.append(time.perf_counter() - t0)
        tokens.append(answer.usage.completion_tokens)
        t0, seen, count = time.perf_counter(), None, 0
        for chunk in client.chat.completions.create(stream=True, **params):
            if chunk.choices and chunk.choices[0].delta.content:
                count += 1
                seen = seen if seen is not None else time.perf_counter() - t0
        end.append(time.perf_counter() - t0)
        first.append(seen if seen is not None else float("nan"))
        chunks.append(count)
    med = statistics.median
    print(f"completion tokens {med(tokens):.0f}; whole answer {1000 * med(whole):.0f} ms; streamed: first content "
          f"{1000 * med(first):.0f} ms, end {1000 * med(end):.0f} ms, {med(chunks):.0f} content chunks "
          f"(medians of {requests})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--work-dir", default=None, help="model + stack logs (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-openai-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir(args.shape, work / f"model-{args.shape}")
    print(f"# {args.shape} random weights on {args.device}; greedy chat, {args.new_tokens} new tokens; stack log "
          f"{work / 'stack.log'}", flush=True)
    with running_stack(model_dir, args.device, work / "stack.log") as url:
        bench(url, str(model_dir), args.new_tokens, args.requests)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# One device-tool call for docs/benchmarks.md (issue 7): training (bare PEFT vs backend vs full bus path,
# 8 interleaved adapters, per-call latency) and sampling (engine vs generate, dynamic and static+compile).
# Needs the cp312 wheels in .whl/ (see docs/benchmarks.md) carried with the call.
set -uo pipefail
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__,
torch.cuda.get_device_name())"
timeout "${TRAIN_1B_S:-230}" python3 -m bench.bench_training --shape llama-1b --steps 5 --warmup 2 --adapters 8 \
  2>&1 | grep -v -E "HTTP/1.1|it/s]" | tee "$OUT/train-llama-1b.log"
timeout "${SAMPLE_1B_S:-190}" python3 bench/bench_sampling.py --model-config llama-1b --device cuda --batch 64 \
  --new-tokens 128 --prompt-len 64 --repeats 2 --adapters 8 2>&1 | tee "$OUT/sample-llama-1b.log"
timeout "${TRAIN_8B_S:-140}" python3 -m bench.bench_training --shape llama-8b --steps 3 --warmup 1 --skip bus,multi \
  2>&1 | grep -v -E "it/s]" | tee "$OUT/train-llama-8b.log"

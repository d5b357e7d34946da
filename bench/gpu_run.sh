#!/usr/bin/env bash
# The device-tool calls behind docs/benchmarks.md (issue 7), one table per stage:
#   bash bench/gpu_run.sh train1b   # bare PEFT vs backend (eager, compiled) vs full bus path, 8 adapters, latency
#   bash bench/gpu_run.sh sample1b  # sampler engine decode vs static-cache compiled generate, batch 64 and 256
#   bash bench/gpu_run.sh train8b   # bare PEFT vs backend on the 8B shape
#   bash bench/gpu_run.sh sample8b
#   bash bench/gpu_run.sh kernels   # the sampler's Triton kernels and engine paths vs torch, on the GPU (pytest)
#   bash bench/gpu_run.sh rollout1b # the rl_basic rollout round through SDK -> gateway -> Kafka -> sampler
#   bash bench/gpu_run.sh rollout8b
# Stages can be listed together. Needs the cp312 wheels in $WHEELS (default .whl/, see docs/benchmarks.md) carried
# with the call; logs and torch-profiler kernel tables land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${WHEELS:-.whl}"/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__,
torch.cuda.get_device_name())"
quiet() { grep --line-buffered -v -E "HTTP/1.1|it/s]|USDT|profiler_st"; }
for stage in "$@"; do
  case $stage in
    train1b) timeout "${STAGE_S:-380}" python3 -m bench.bench_training --shape llama-1b --steps 5 --warmup 2 \
        --adapters 8 --profile "$OUT/profile-train-llama-1b.txt" 2>&1 | quiet | tee "$OUT/train-llama-1b.log" ;;
    sample1b) timeout "${SAMPLE_S:-${STAGE_S:-300}}" python3 bench/bench_sampling.py --model-config llama-1b --device cuda \
        --batch "${BATCHES:-64,256}" --new-tokens 128 --prompt-len 64 --repeats 2 --adapters 8 --check \
        ${SAMPLE_ARGS:-} --profile "$OUT/profile-sample-llama-1b.txt" 2>&1 | quiet | tee "$OUT/sample-llama-1b.log" ;;
    train8b) timeout "${STAGE_S:-540}" python3 -m bench.bench_training --shape llama-8b --steps 3 --warmup 1 \
        --adapters 8 --skip "${SKIP:-bus,multi}" --profile "$OUT/profile-train-llama-8b.txt" 2>&1 | quiet | tee "$OUT/train-llama-8b.log" ;;
    sample8b) timeout "${SAMPLE_S:-${STAGE_S:-300}}" python3 bench/bench_sampling.py --model-config llama-8b --device cuda \
        --batch "${BATCHES:-64,256}" --new-tokens 128 --prompt-len 64 --repeats 2 --adapters 8 ${SAMPLE_ARGS:-} \
        --profile "$OUT/profile-sample-llama-8b.txt" 2>&1 | quiet | tee "$OUT/sample-llama-8b.log" ;;
    kernels) timeout "${KERNELS_S:-${STAGE_S:-120}}" python3 -m pytest -q -x -p no:cacheprovider tests/test_sampler_kernels.py 2>&1 \
        | tee "$OUT/kernels.log" ;;
    rollout1b|rollout8b) shape=llama-${stage#rollout}
      timeout "${ROLLOUT_S:-${STAGE_S:-420}}" python3 -m bench.bench_rollout --shape "$shape" --device cuda --work-dir /tmp/rollout \
        ${ROLLOUT_ARGS:-} 2>&1 | quiet | tee "$OUT/rollout-$shape.log"
      grep -h -E "sampler engine|capturing|ERROR|Traceback|failed|Error" /tmp/rollout/stack/logs/sampler.log \
        /tmp/rollout/stack.log | cut -c1-400 | tail -80 \
        > "$OUT/rollout-$shape-stack.log" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done

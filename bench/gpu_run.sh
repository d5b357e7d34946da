#!/usr/bin/env bash
# The device-tool calls behind docs/benchmarks.md (issue 7), one table per stage:
#   bash bench/gpu_run.sh train1b   # bare PEFT vs backend (eager, compiled) vs full bus path, 8 adapters, latency
#   bash bench/gpu_run.sh sample1b  # sampler engine decode vs static-cache compiled generate, batch 64 and 256
#   bash bench/gpu_run.sh train8b   # bare PEFT vs backend vs full bus path on the 8B shape (40-step windows)
#   bash bench/gpu_run.sh sample8b
#   bash bench/gpu_run.sh kernels   # the sampler's Triton kernels and engine paths vs torch, on the GPU (pytest)
#   bash bench/gpu_run.sh kernelbench # the sampler's LoRA and decode-attention kernels, old vs new, in CUDA graphs
#   bash bench/gpu_run.sh rollout1b # the rl_basic rollout round through SDK -> gateway -> Kafka -> sampler
#   bash bench/gpu_run.sh rollout8b
#   bash bench/gpu_run.sh megatron8b          # Megatron TP=1,2,4,8 on the 8B shape ($TPS: TP=1,2,4 on 4 GPUs)
#   bash bench/gpu_run.sh megatron70b-weights # write the random 70B checkpoint (131 GiB) to $BENCH_DIR, once
#   bash bench/gpu_run.sh megatron70b         # Megatron TP=8 on the 70B shape ($TPS=4,8 to add TP=4)
# The megatron stages need the nvidia-h200-x4 / -x8 kinds and megatron_core 0.19.2 (not in .whl2: put its cp312
# wheel in a folder named by $EXTRA_WHEELS, e.g. .dev/<name>/wheels). The 70B checkpoint needs ~132 GiB of disk
# under $BENCH_DIR (default /tmp/tinker-bus-bench), which must survive between the two 70B calls (same warm machine).
# Stages can be listed together. Needs the cp312 wheels in $WHEELS (default .whl/, see docs/benchmarks.md) carried
# with the call; logs and torch-profiler kernel tables land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${WHEELS:-.whl}"/*.whl \
  ${EXTRA_WHEELS:+"$EXTRA_WHEELS"/*.whl} || exit 1
BENCH_DIR=${BENCH_DIR:-/tmp/tinker-bus-bench}
export PATH=/tmp/site/bin:$PATH PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__,
torch.cuda.get_device_name())"
quiet() { grep --line-buffered -v -E "HTTP/1.1|it/s]|USDT|profiler_st"; }
for stage in "$@"; do
  case $stage in
    train1b) timeout "${STAGE_S:-380}" python3 -m bench.bench_training --shape llama-1b --steps 40 --warmup 2 \
        --adapters 8 --profile "$OUT/profile-train-llama-1b.txt" 2>&1 | quiet | tee "$OUT/train-llama-1b.log" ;;
    sample1b) timeout "${SAMPLE_S:-${STAGE_S:-300}}" python3 bench/bench_sampling.py --model-config llama-1b --device cuda \
        --batch "${BATCHES:-64,256}" --new-tokens 128 --prompt-len 64 --repeats 2 --adapters 8 --check \
        ${SAMPLE_ARGS:-} --profile "$OUT/profile-sample-llama-1b.txt" 2>&1 | quiet | tee "$OUT/sample-llama-1b.log" ;;
    train8b) timeout "${STAGE_S:-540}" python3 -m bench.bench_training --shape llama-8b --steps 40 --warmup 1 \
        --adapters 8 --skip "${SKIP:-eager,multi,tiny}" --profile "$OUT/profile-train-llama-8b.txt" 2>&1 | quiet | tee "$OUT/train-llama-8b.log" ;;
    sample8b) timeout "${SAMPLE_S:-${STAGE_S:-300}}" python3 bench/bench_sampling.py --model-config llama-8b --device cuda \
        --batch "${BATCHES:-64,256}" --new-tokens 128 --prompt-len 64 --repeats 2 --adapters 8 ${SAMPLE_ARGS:-} \
        --profile "$OUT/profile-sample-llama-8b.txt" 2>&1 | quiet | tee "$OUT/sample-llama-8b.log" ;;
    kernels) timeout "${KERNELS_S:-${STAGE_S:-120}}" python3 -m pytest -q -x -p no:cacheprovider tests/test_sampler_kernels.py 2>&1 \
        | tee "$OUT/kernels.log" ;;
    kernelbench) timeout "${KERNELBENCH_S:-${STAGE_S:-150}}" python3 bench/bench_kernels.py --log "$OUT/bench-kernels.log" \
        2>&1 | grep -v -i warn ;;
    rollout1b|rollout8b) shape=llama-${stage#rollout}
      timeout "${ROLLOUT_S:-${STAGE_S:-420}}" python3 -m bench.bench_rollout --shape "$shape" --device cuda --work-dir /tmp/rollout \
        ${ROLLOUT_ARGS:-} 2>&1 | quiet | tee "$OUT/rollout-$shape.log"
      grep -h -E "sampler engine|capturing|ERROR|Traceback|failed|Error" /tmp/rollout/stack/logs/sampler.log \
        /tmp/rollout/stack.log | cut -c1-400 | tail -80 \
        > "$OUT/rollout-$shape-stack.log" ;;
    megatron8b) timeout "${MEGATRON_S:-${STAGE_S:-570}}" python3 -m bench.bench_megatron --shapes llama-8b \
        --backends megatron --tensor-parallel "${TPS:-1,2,4,8}" --steps 3 --warmup 1 --workdir "$BENCH_DIR" 2>&1 \
        | quiet | tee "$OUT/megatron-llama-8b.log" ;;
    megatron70b-weights) df -h "$(dirname "$BENCH_DIR")" | tee "$OUT/megatron70b-weights.log"
      timeout "${MEGATRON_S:-${STAGE_S:-570}}" python3 -c "import sys, time; from pathlib import Path
from bench.shapes import build_model_dir
t0 = time.perf_counter(); print(build_model_dir('llama-70b', Path(sys.argv[1]) / 'llama-70b'),
f'{time.perf_counter() - t0:.0f} s')" "$BENCH_DIR" 2>&1 | quiet | tee -a "$OUT/megatron70b-weights.log" ;;
    megatron70b) timeout "${MEGATRON_S:-${STAGE_S:-570}}" python3 -m bench.bench_megatron --shapes llama-70b \
        --backends megatron --tensor-parallel "${TPS:-8}" --steps 2 --warmup 1 --workdir "$BENCH_DIR" 2>&1 \
        | quiet | tee "$OUT/megatron-llama-70b.log" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done

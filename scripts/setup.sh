#!/usr/bin/env bash
# Creates .venv (Python 3.10+) with torch, megatron-core and this package; idempotent.
# Machines without CUDA get PyTorch's CPU build (the +cpu wheel from PyTorch's CPU index ranks above
# PyPI's CUDA build); machines with an NVIDIA driver get PyPI's default (CUDA) build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" install "torch==${TORCH_VERSION}"
  else
    "${PIP[@]}" install --retries 1 --timeout 30 --extra-index-url https://download.pytorch.org/whl/cpu \
      "torch==${TORCH_VERSION}"
  fi
fi
"${PIP[@]}" install -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import megatron_minitron, megatron.core, torch; print('torch', torch.__version__, '| megatron-core', megatron.core.__version__)"

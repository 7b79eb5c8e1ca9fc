#!/usr/bin/env bash
# Sets up .venv if needed, then runs the whole test suite (CPU, gloo; multi-rank tests launch torchrun).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"

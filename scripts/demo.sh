#!/usr/bin/env bash
# Sets up .venv if needed, then runs `minitron demo`: the whole Minitron method on the embedded corpus
# (teacher training, importance at TP=2 over 2 processes, pruning, distillation and its baselines at
# equal tokens), writing runs/demo/report.md. A second run reuses the trained teacher. Extra arguments go
# to `minitron demo` (see `--help`: steps, sizes, TP/PP, processes, data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m megatron_minitron demo "$@"

#!/usr/bin/env bash
# Sets up .venv if needed, then trains the ~10M-parameter demo teacher on the embedded corpus with
# tensor parallelism over 2 processes (gloo on CPU, NCCL on GPU). Extra arguments go to `minitron pretrain`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
resume=()
[ -f runs/demo-teacher/latest_checkpointed_iteration.txt ] && resume=(--resume)  # a finished run is kept
exec .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 -m megatron_minitron pretrain \
  --arch small --tp 2 --save runs/demo-teacher "${resume[@]}" \
  --train-iters 200 --seq-length 256 --micro-batch-size 4 --global-batch-size 8 --eval-interval 50 "$@"

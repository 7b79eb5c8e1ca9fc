#!/usr/bin/env bash
# Runs one minitron subcommand under torchrun on this node, single- or multi-node:
#   launch/torchrun.sh [--dry-run] SUBCOMMAND [minitron flags...]
# (launch/importance.sh, prune.sh, distill.sh and pretrain.sh call this with their subcommand.)
#
# Rendezvous comes from the environment; run the same command on every node:
#   NPROC_PER_NODE  processes on this node (default: the GPUs nvidia-smi lists, else 1)
#   NNODES          nodes in the job (default: $SLURM_NNODES, else 1)
#   NODE_RANK       this node's index (default: $SLURM_NODEID, else 0); static rendezvous only
#   MASTER_ADDR     rendezvous host (default when NNODES=1: torchrun --standalone picks a free port)
#   MASTER_PORT     rendezvous port (default 29500)
#   RDZV_ENDPOINT   host:port of a c10d rendezvous instead (node ranks assigned at rendezvous);
#                   RDZV_ID names the job (default: $SLURM_JOB_ID, else "minitron")
#   PYTHON          interpreter that has megatron_minitron installed (default: python3)
# --dry-run prints the torchrun command and the command each of this node's ranks would run.
set -euo pipefail

dry_run=0
if [[ ${1:-} == --dry-run ]]; then dry_run=1; shift; fi
if [[ $# -lt 1 || ${1:-} == -* ]]; then
  echo "usage: $0 [--dry-run] SUBCOMMAND [minitron flags...]" >&2
  exit 2
fi
job=$1; shift

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
nproc=${NPROC_PER_NODE:-$((gpus > 0 ? gpus : 1))}
nnodes=${NNODES:-${SLURM_NNODES:-1}}
node_rank=${NODE_RANK:-${SLURM_NODEID:-0}}
python=${PYTHON:-python3}

cmd=("$python" -m torch.distributed.run --nproc-per-node "$nproc")
if [[ -n ${RDZV_ENDPOINT:-} ]]; then
  cmd+=(--nnodes "$nnodes" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT"
        --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-minitron}}")
  addr="<host-of-rank-0>" port="<chosen-at-rendezvous>" first_rank=""
elif [[ -n ${MASTER_ADDR:-} || $nnodes -gt 1 ]]; then
  : "${MASTER_ADDR:?NNODES=$nnodes needs MASTER_ADDR (and MASTER_PORT) or RDZV_ENDPOINT=host:port}"
  addr=$MASTER_ADDR port=${MASTER_PORT:-29500} first_rank=$((node_rank * nproc))
  cmd+=(--nnodes "$nnodes" --node-rank "$node_rank" --master-addr "$addr" --master-port "$port")
else
  cmd+=(--standalone)
  addr=127.0.0.1 port="<picked-by-standalone>" first_rank=0
fi
cmd+=(-m megatron_minitron "$job" "$@")

if ((dry_run)); then
  # Values in <angle brackets> are only known once torchrun starts; everything else is exact.
  q() { local line; line=$(printf '%q ' "$@"); echo "${line% }"; }
  echo "# node $node_rank of $nnodes runs:"
  q "${cmd[@]}"
  echo "# which starts $nproc rank(s) here, each running:"
  [[ $addr == '<'* ]] || addr=$(q "$addr")
  for ((local = 0; local < nproc; local++)); do
    rank=${first_rank:+$((first_rank + local))}
    echo "RANK=${rank:-<assigned-at-rendezvous>} LOCAL_RANK=$local WORLD_SIZE=$((nnodes * nproc))" \
      "MASTER_ADDR=$addr MASTER_PORT=$port $(q "$python" -m megatron_minitron "$job" "$@")"
  done
  exit 0
fi
exec "${cmd[@]}"

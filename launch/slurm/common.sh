# shellcheck shell=bash
# Sourced by launch/slurm/*.sbatch on the job's first node. Reads the site file, then starts one
# srun task per rank (the allocation's tasks: one per GPU) running `minitron JOB ARGS`. Node count,
# tasks and GPUs per node are Slurm's own (SLURM_NNODES, SLURM_NTASKS, SLURM_GPUS_ON_NODE).

: "${MINITRON_SITE:?submit with launch/sbatch.sh, or export MINITRON_HOME and MINITRON_SITE}"
MINITRON_SRUN_ARGS=()
# shellcheck source=launch/site.env.example
source "$MINITRON_SITE"

minitron_srun() {
  local job=$1
  shift
  local per_node=$((SLURM_NTASKS / SLURM_NNODES))
  if [[ -n ${SLURM_GPUS_ON_NODE:-} && $SLURM_GPUS_ON_NODE != "$per_node" ]]; then
    echo "minitron $job: $per_node tasks but $SLURM_GPUS_ON_NODE GPUs per node; submit with" \
      "--ntasks-per-node equal to --gpus-per-node (one rank per GPU)" >&2
    return 2
  fi
  # Rendezvous on the first node, port from the job id (what runtime/dist.py derives too); set
  # here because scontrol may be missing inside a container.
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
  export MASTER_ADDR MASTER_PORT
  # task/none or cgroups: torch would otherwise start one thread per core in every rank.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  echo "minitron $job: $SLURM_NNODES node(s) x $per_node task(s), rendezvous $MASTER_ADDR:$MASTER_PORT"
  # Each task learns its rank the way torchrun would tell it (prune's worker sharing reads WORLD_SIZE).
  # shellcheck disable=SC2016
  srun --kill-on-bad-exit=1 "${MINITRON_SRUN_ARGS[@]}" bash -c \
    'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; exec "$@"' \
    rank "${MINITRON_PYTHON:-python3}" -m megatron_minitron "$job" "$@"
}

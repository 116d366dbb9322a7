#!/usr/bin/env bash
# Launch pretrain_evomoe.py on the nodes of a SLURM allocation: one srun task per node, each running
# torchrun with one process per GPU; torchrun's c10d rendezvous on the first node of the allocation.
#
#   bash examples/slurm/launch.sh [--dry-run] --config CONFIG [--section.field=value ...]
#
# Environment (all optional):
#   GPUS_PER_NODE   processes per node (default: SLURM_GPUS_ON_NODE, else nvidia-smi's count, else 1)
#   MASTER_PORT     rendezvous port on the first node (default 29500)
#   DRY_RUN=1       same as --dry-run: print the planned layout and the exact commands, launch nothing
#   NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...  passed through to NCCL untouched when set
#   PYTHON          interpreter for the layout check (default python)
# Called by train_single_node.sbatch and train_multi_node.sbatch; usable from `salloc` too.
set -euo pipefail

DRY_RUN=${DRY_RUN:-0}
ARGS=()
for a in "$@"; do
  if [[ "$a" == "--dry-run" ]]; then DRY_RUN=1; else ARGS+=("$a"); fi
done

: "${SLURM_JOB_NODELIST:?not inside a SLURM allocation (SLURM_JOB_NODELIST is unset); use sbatch/salloc}"
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    GPUS_PER_NODE=$SLURM_GPUS_ON_NODE
  elif command -v nvidia-smi >/dev/null 2>&1; then
    GPUS_PER_NODE=$(nvidia-smi --list-gpus | wc -l)
  else
    GPUS_PER_NODE=1
  fi
fi
WORLD_SIZE=$((NNODES * GPUS_PER_NODE))

# First node of the allocation = rendezvous host (scontrol expands gpu[01-04] -> gpu01 ...).
if command -v scontrol >/dev/null 2>&1; then
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # (sed reads all: no SIGPIPE under pipefail)
else
  MASTER_ADDR=$(${PYTHON:-python} -c "import sys; from megatron_evomoe.parallel.launch import expand_nodelist; print(expand_nodelist(sys.argv[1])[0])" "$SLURM_JOB_NODELIST")
fi
MASTER_PORT=${MASTER_PORT:-29500}

# NCCL / torch environment for multi-node GPU jobs.
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}  # NCCL errors end the process without an abort that can hang (parallel/launch.py)
export NCCL_ASYNC_ERROR_HANDLING=$TORCH_NCCL_ASYNC_ERROR_HANDLING              # older torch spelling
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

CMD=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1
     torchrun --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE"
     --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${SLURM_JOB_ID:-evomoe}"
     pretrain_evomoe.py "${ARGS[@]}")

echo "nodes: $NNODES ($SLURM_JOB_NODELIST), GPUs per node: $GPUS_PER_NODE, world size: $WORLD_SIZE"
echo "rendezvous: $MASTER_ADDR:$MASTER_PORT (job ${SLURM_JOB_ID:-?})"
echo "env: OMP_NUM_THREADS=$OMP_NUM_THREADS NCCL_DEBUG=$NCCL_DEBUG TORCH_NCCL_ASYNC_ERROR_HANDLING=$TORCH_NCCL_ASYNC_ERROR_HANDLING${NCCL_SOCKET_IFNAME:+ NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME}"
# The layout check validates the config against the world size before any GPU time is spent.
${PYTHON:-python} -m megatron_evomoe.parallel.launch --world-size "$WORLD_SIZE" "${ARGS[@]}"
printf 'command:'; printf ' %q' "${CMD[@]}"; printf '\n'

if [[ "$DRY_RUN" == "1" ]]; then
  echo "dry run: nothing launched"
  exit 0
fi

# Pre-emption and the time limit: the sbatch scripts ask SLURM for USR1 120 s before the end
# (--signal=B:USR1@120). It is forwarded as SIGTERM to srun -> torchrun -> every worker: the trainer
# stops at the next step boundary on all ranks, saves a checkpoint and exits 75; the job is requeued
# (--requeue) and the same command resumes from that checkpoint. A SIGTERM to this script (scancel)
# is forwarded the same way, without the requeue.
REQUEUE=0
forward() { REQUEUE=$1; kill -TERM "$PID" 2>/dev/null || true; }
trap 'forward 1' USR1
trap 'forward 0' TERM
"${CMD[@]}" &
PID=$!
set +e
while true; do
  wait "$PID"
  rc=$?
  kill -0 "$PID" 2>/dev/null || break  # (wait also returns when a trapped signal arrives)
done
set -e
if [[ "$REQUEUE" == "1" && -n "${SLURM_JOB_ID:-}" ]]; then
  echo "pre-empted: checkpoint saved (exit code $rc); requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"

#!/usr/bin/env bash
# Multi-node RawNet2 training with Slurm + torchrun: one Slurm task per node, each running torchrun
# with one process per GPU. Submit with:   sbatch launch_slurm.sh -name paper_4x8
# Every argument is passed to train_RawNet2.py. -bs stays the GLOBAL batch (split over all processes).
#SBATCH --job-name=rawnet2
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
set -euo pipefail

GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT="${PORT:-29500}"

# --max-restarts: a failed process makes the whole group restart and continue from last.pt
# by itself; so does a job that Slurm requeues (SLURM_RESTART_COUNT > 0).
srun torchrun \
  --nnodes="$SLURM_NNODES" --nproc_per_node="$GPUS_PER_NODE" \
  --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$HEAD_NODE:$PORT" \
  --max-restarts=3 \
  train_RawNet2.py -nb_worker 8 "$@"

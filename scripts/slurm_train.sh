#!/bin/bash
# SOLQ training on a SLURM cluster: one torchrun per node, one process per GPU, rendezvous on the first node.
# Submit from the repository root:   sbatch scripts/slurm_train.sh
# Override the defaults with environment variables, e.g.
#   CONFIG=paper-r50 OUTPUT=runs/r50_256 COCO=/datasets/coco sbatch --nodes=4 scripts/slurm_train.sh
# 2 nodes x 8 GPUs x 2 images = the release's total batch of 32 (reference §1.1); with other node counts
# keep nodes x GPUs x train.batch_size x train.accumulate = 32.
#SBATCH --job-name=solq
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=72:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --requeue
set -euo pipefail

CONFIG=${CONFIG:-release-r50}
OUTPUT=${OUTPUT:-runs/solq_r50}
COCO=${COCO:-/data/coco}
BATCH=${BATCH:-2}
GPUS=${SLURM_GPUS_PER_NODE:-8}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

source .venv/bin/activate
export OMP_NUM_THREADS=4  # data-loading workers share the node's CPUs

# --resume auto: a requeued or restarted job continues from the newest valid checkpoint in $OUTPUT.
srun torchrun \
    --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$GPUS" \
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$HEAD:29500" \
    -m solq.cli train --config "$CONFIG" \
    --set data.dataset=coco data.root="$COCO" train.batch_size="$BATCH" data.num_workers=4 \
    --output "$OUTPUT" --resume auto --save-every-steps 2000 --no-progress

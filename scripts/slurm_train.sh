#!/bin/bash
# SOLQ training on a SLURM cluster: one torchrun per node, one process per GPU, rendezvous on the first node.
# Submit from the repository root:   sbatch scripts/slurm_train.sh
# Override the defaults with environment variables, e.g.
#   CONFIG=paper-r50 OUTPUT=runs/r50_256 COCO=/datasets/coco sbatch --nodes=4 scripts/slurm_train.sh
# 2 nodes x 8 GPUs x 2 images = the release's total batch of 32 (8 GPUs x 4 images, the paper's Sec. 4.1); with other node counts
# keep nodes x GPUs x train.batch_size x train.accumulate = 32.
#SBATCH --job-name=solq
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=72:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
# 120 s before the time limit SLURM sends USR1 to this script (B: the batch shell only); the trap below passes it
# to the training processes, which finish the current optimiser step, checkpoint it and exit; the job is then
# requeued and continues from that checkpoint (--resume auto).
#SBATCH --signal=B:USR1@120
set -euo pipefail

CONFIG=${CONFIG:-release-r50}
OUTPUT=${OUTPUT:-runs/solq_r50}
COCO=${COCO:-/data/coco}
BATCH=${BATCH:-2}
GPUS=${SLURM_GPUS_PER_NODE:-8}
STOP_GRACE=${STOP_GRACE:-90}  # train.stop_grace_s: the stop must be done within the 120 s warning
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

source .venv/bin/activate
export OMP_NUM_THREADS=4  # data-loading workers share the node's CPUs

# torchrun passes USR1 on to its workers only when told to, and waits --shutdown-timeout seconds for them
# before SIGKILL: longer than the workers' own grace period.
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1

# --resume auto: a requeued or restarted job continues from the newest valid checkpoint in $OUTPUT.
srun torchrun \
    --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$GPUS" \
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$HEAD:29500" \
    --shutdown-timeout=$((STOP_GRACE + 20)) \
    -m solq.cli train --config "$CONFIG" \
    --set data.dataset=coco data.root="$COCO" train.batch_size="$BATCH" data.num_workers=4 \
    train.stop_grace_s="$STOP_GRACE" \
    --output "$OUTPUT" --resume auto --save-every-steps 2000 --no-progress &
TRAIN=$!

# USR1 (the time-limit warning) or TERM (preemption): srun passes the signal to the torchrun of every node.
STOPPED=""
stop() { STOPPED=$1; echo "$(date): $1 received, asking the training to checkpoint and stop"; kill -"$1" "$TRAIN"; }
trap 'stop USR1' USR1
trap 'stop TERM' TERM

STATUS=0
wait "$TRAIN" || STATUS=$?
while [ -n "$STOPPED" ] && kill -0 "$TRAIN" 2>/dev/null; do  # a trapped signal ends `wait` early: wait again
    STATUS=0
    wait "$TRAIN" || STATUS=$?
done
if [ -n "$STOPPED" ]; then
    # torchrun exits non-zero after a signal even when its workers stopped cleanly (status 0, checkpoint
    # written): requeue either way; --resume auto takes the newest valid checkpoint.
    echo "$(date): training stopped by $STOPPED (status $STATUS); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || echo "$(date): scontrol requeue refused (did SLURM requeue the job itself?)"
    exit 0
fi
exit "$STATUS"

#!/bin/bash
# CLIP-KD on SLURM: ViT-B-16 teacher (CC3M+CC12M) -> ViT-T-16 student, the published recipe (34.90 ImageNet top-1).
#
#   sbatch --export=ALL,CC3M_CSV=/data/cc3m_train.csv,CC12M_CSV=/data/cc12m.csv,TEACHER_CKPT=/ckpt/ViT_B_16_cc3m_12m_ep32.pt \
#       slurm/vit_t_kd.sh
#
# One torchrun per node (srun), rendezvous on the first node; 8 GPUs x 128 images = the published global batch of
# 1024 on one node (on 2 nodes, halve BATCH or keep it and get 2048). The job requeues itself 5 minutes before its
# time limit (--signal: the trainer checkpoints the current step first) and on node failure (--requeue, losing at
# most SAVE_EVERY steps); the next run resumes from the newest checkpoint of the fixed run name (--resume latest).
#
# Environment: see scripts/recipes/common.sh (CC3M_CSV, CC12M_CSV, TEACHER_CKPT, DATA_ROOT, VAL_CSV, IMAGENET_VAL,
# LOGS, NAME, BATCH, SAVE_EVERY, EXTRA_ARGS e.g. "--fsdp"), plus REPO (the clip-kd checkout; default: the
# submit directory) and MASTER_PORT.
#SBATCH --job-name=clipkd-vit-t16
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=%x-%j.out
set -euo pipefail

REPO="${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
cd "$REPO"
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
# shellcheck source=../scripts/recipes/common.sh
source scripts/recipes/common.sh

: "${NAME:=slurm_kd_vitb16_vit_t16}"            # fixed: a requeued job resumes this run
GPUS_PER_NODE="${SLURM_GPUS_ON_NODE:-${GPUS_PER_NODE:-8}}"
export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)}"
export MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
LAUNCHER="srun --kill-on-bad-exit=1 torchrun --nnodes=${SLURM_NNODES:-1} --nproc_per_node=$GPUS_PER_NODE \
--rdzv_id=${SLURM_JOB_ID:-0} --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT"

# USR1 (--signal=B:USR1@300) reaches this shell only: ask the trainer on every node to finish its step, write a
# checkpoint and exit (it watches $LOGS/$NAME/stop), then requeue; the next job resumes from that checkpoint.
stop_and_requeue() {
    echo "[slurm] USR1: time limit near, checkpointing and requeueing job ${SLURM_JOB_ID:-?}"
    mkdir -p "$LOGS/$NAME" && touch "$LOGS/$NAME/stop"
    wait "$TRAIN_PID" || true
    scontrol requeue "${SLURM_JOB_ID}"
}
trap stop_and_requeue USR1

run_training() {
    run_recipe "$NAME" \
        --model ViT-T-16 \
        --teacher ViT-B-16 --teacher-pretrained "${TEACHER_CKPT:?set TEACHER_CKPT to ViT_B_16_cc3m_12m_ep32.pt}" \
        --recipe clip-kd \
        "$@"
}

if [ "${DRY_RUN:-0}" = "1" ]; then
    run_training "$@"
else
    run_training "$@" &   # in the background, so the USR1 trap runs while training does
    TRAIN_PID=$!
    wait "$TRAIN_PID"
fi

# shellcheck shell=bash
# Sourced by every recipe in scripts/recipes/ and by slurm/*.sh: CLIP-KD's published set-up and the launcher.
#
# Published hyper-parameters (CLIP-KD, CVPR 2024): CC3M+CC12M, 8 GPUs x 128 images, AdamW lr 1e-3, wd 0.1,
# 32 epochs, 10000 warm-up steps, amp; KD = --recipe clip-kd (task + crd 1 + icl 1 + fd 2000).
#
# Environment:
#   CC3M_CSV, CC12M_CSV  CLIP-KD's training CSVs (tab-separated, columns title and filepath)        [required]
#   DATA_ROOT            root(s) joined to relative image paths (comma list, one per CSV)
#   VAL_CSV              CC3M validation CSV: retrieval metrics every epoch
#   IMAGENET_VAL         ImageNet val image folder with classnames.txt: zero-shot every epoch
#   TEACHER_CKPT         the teacher's weights, where the recipe needs a local file
#   LOGS (./logs)  NAME (the recipe's name)  NPROC (8)  BATCH (128 per GPU)  WORKERS (8)  PRECISION (amp)
#   SAVE_EVERY (1000)    mid-epoch checkpoint every N steps (what a requeued job loses at most)
#   EXTRA_ARGS           more flags, e.g. "--fsdp" or "--accum-freq 2 --batch-size 64"
#   LAUNCHER             the command before "-m training.main" (default: torchrun --standalone on NPROC GPUs)
#   DRY_RUN=1            print the command, one argument per line, instead of running it
# Arguments given to a recipe script are appended to its flags.

: "${NPROC:=8}" "${BATCH:=128}" "${WORKERS:=8}" "${PRECISION:=amp}" "${LOGS:=./logs}" "${SAVE_EVERY:=1000}"

# The flags every CLIP-KD run shares (data, optimisation, logging, auto-resume).
clip_kd_common_flags() {
    : "${CC3M_CSV:?set CC3M_CSV to CLIP-KD's cc3m_train.csv (scripts/prepare_cc3m.sh)}"
    : "${CC12M_CSV:?set CC12M_CSV to CLIP-KD's cc12m.csv (scripts/prepare_cc12m.sh)}"
    COMMON=(--train-data "$CC3M_CSV,$CC12M_CSV" --dataset-type csv --csv-img-key filepath --csv-caption-key title
            --batch-size "$BATCH" --epochs 32 --lr 1e-3 --wd 0.1 --warmup 10000 --precision "$PRECISION"
            --workers "$WORKERS" --logs-dir "$LOGS" --name "$NAME" --resume latest
            --save-every-n-steps "$SAVE_EVERY" --report-to tensorboard)
    if [ -n "${DATA_ROOT:-}" ]; then COMMON+=(--data-root "$DATA_ROOT"); fi
    if [ -n "${VAL_CSV:-}" ]; then COMMON+=(--val-data "$VAL_CSV"); fi
    if [ -n "${IMAGENET_VAL:-}" ]; then COMMON+=(--zeroshot-data "$IMAGENET_VAL"); fi
}

# run_recipe NAME FLAGS... : launch training.main with the common flags, the recipe's flags, EXTRA_ARGS and the
# script's own arguments (pass them last: run_recipe name --model ... "$@").
run_recipe() {
    : "${NAME:=$1}"
    shift
    clip_kd_common_flags
    local extra=()
    if [ -n "${EXTRA_ARGS:-}" ]; then read -r -a extra <<< "$EXTRA_ARGS"; fi
    local launcher=()
    if [ -n "${LAUNCHER:-}" ]; then
        read -r -a launcher <<< "$LAUNCHER"
    else
        launcher=(torchrun --standalone --nproc_per_node="$NPROC")
    fi
    local cmd=("${launcher[@]}" -m training.main "${COMMON[@]}" "$@" "${extra[@]}")
    if [ "${DRY_RUN:-0}" = "1" ]; then
        printf '%s\n' "${cmd[@]}"
        return 0
    fi
    echo "[recipe] $NAME: ${cmd[*]}" >&2
    "${cmd[@]}"
}

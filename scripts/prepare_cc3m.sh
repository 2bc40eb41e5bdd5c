#!/usr/bin/env bash
# Conceptual Captions 3M -> WebDataset shards, with img2dataset (https://github.com/rom1504/img2dataset).
#
#   scripts/prepare_cc3m.sh Train_GCC-training.tsv /data/cc3m_wds
#   scripts/prepare_cc3m.sh Validation_GCC-1.1.0-Validation.tsv /data/cc3m_val_wds
#
# Input: the official CC3M TSV (caption<TAB>url, no header; a header line "caption<TAB>url" is also accepted).
# Output in OUT_DIR: 00000.tar ... (each sample: <key>.jpg, <key>.txt caption, <key>.json metadata), img2dataset's
# per-shard NNNNN_stats.json and NNNNN.parquet (success/failure of every URL), plus, written by this script,
# sizes.json ({"00000.tar": successes}, read by the loader instead of --train-num-samples) and stats_summary.json.
# Re-running the same command resumes: img2dataset's incremental mode skips finished shards.
#
# Images are resized so the shorter side is IMAGE_SIZE (RESIZE_MODE=keep_ratio: the whole picture is kept and the
# training-time RandomResizedCrop picks the view) and never upscaled; RESIZE_MODE=center_crop stores IMAGE_SIZE^2
# centre crops instead (smaller, loses the borders), border pads to a square. Everything below is env-overridable.
set -euo pipefail

NAME=cc3m
COLUMNS="caption url"   # column order of the official file
# shellcheck source=prepare_cc_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/prepare_cc_common.sh" "$@"

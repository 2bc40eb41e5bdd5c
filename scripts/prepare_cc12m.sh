#!/usr/bin/env bash
# Conceptual 12M -> WebDataset shards, with img2dataset (https://github.com/rom1504/img2dataset).
#
#   scripts/prepare_cc12m.sh cc12m.tsv /data/cc12m_wds
#
# Input: the official CC12M TSV (url<TAB>caption, no header; a header line "url<TAB>caption" is also accepted).
# Output in OUT_DIR: 00000.tar ... (each sample: <key>.jpg, <key>.txt caption, <key>.json metadata), img2dataset's
# per-shard NNNNN_stats.json and NNNNN.parquet (success/failure of every URL), plus, written by this script,
# sizes.json ({"00000.tar": successes}, read by the loader instead of --train-num-samples) and stats_summary.json.
# Re-running the same command resumes: img2dataset's incremental mode skips finished shards.
#
# Images are resized so the shorter side is IMAGE_SIZE (RESIZE_MODE=keep_ratio: the whole picture is kept and the
# training-time RandomResizedCrop picks the view) and never upscaled; RESIZE_MODE=center_crop stores IMAGE_SIZE^2
# centre crops instead (smaller, loses the borders), border pads to a square. Everything below is env-overridable.
set -euo pipefail

NAME=cc12m
COLUMNS="url caption"   # column order of the official file
# shellcheck source=prepare_cc_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/prepare_cc_common.sh" "$@"

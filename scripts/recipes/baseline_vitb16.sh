#!/usr/bin/env bash
# CLIP-KD baseline: ViT-B/16 trained on CC3M+CC12M without a teacher (task loss only).
# Published ImageNet zero-shot top-1 (CLIP-KD README): 36.99 (37.0 in the LAION table).
# Usage: CC3M_CSV=... CC12M_CSV=... bash scripts/recipes/baseline_vitb16.sh [more flags]
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_recipe baseline_vitb16 \
    --model ViT-B-16 \
    --recipe none \
    "$@"

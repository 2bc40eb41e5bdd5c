#!/usr/bin/env bash
# CLIP-KD baseline: Swin-T trained on CC3M+CC12M without a teacher (task loss only).
# Published ImageNet zero-shot top-1 (CLIP-KD README): 36.38.
# Usage: CC3M_CSV=... CC12M_CSV=... bash scripts/recipes/baseline_swin_t.sh [more flags]
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_recipe baseline_swin_t \
    --model timm-swin_tiny_patch4_window7_224 \
    --recipe none \
    "$@"

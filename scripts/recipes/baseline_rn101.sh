#!/usr/bin/env bash
# CLIP-KD baseline: ResNet-101 trained on CC3M+CC12M without a teacher (task loss only).
# Published ImageNet zero-shot top-1 (CLIP-KD README): 36.76.
# Usage: CC3M_CSV=... CC12M_CSV=... bash scripts/recipes/baseline_rn101.sh [more flags]
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_recipe baseline_rn101 \
    --model RN101 \
    --recipe none \
    "$@"

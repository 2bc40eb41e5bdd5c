#!/usr/bin/env bash
# CLIP-KD baseline: EfficientNet-B0 trained on CC3M+CC12M without a teacher (task loss only).
# Published ImageNet zero-shot top-1 (CLIP-KD README): 32.55.
# Usage: CC3M_CSV=... CC12M_CSV=... bash scripts/recipes/baseline_efficientnet_b0.sh [more flags]
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_recipe baseline_efficientnet_b0 \
    --model timm-efficientnet_b0 \
    --recipe none \
    "$@"

#!/usr/bin/env bash
# CLIP-KD baseline: MobileNetV3-S trained on CC3M+CC12M without a teacher (task loss only).
# Published ImageNet zero-shot top-1 (CLIP-KD README): 25.11.
# Usage: CC3M_CSV=... CC12M_CSV=... bash scripts/recipes/baseline_mobilenetv3_s.sh [more flags]
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_recipe baseline_mobilenetv3_s \
    --model timm-mobilenetv3_small_100 \
    --recipe none \
    "$@"

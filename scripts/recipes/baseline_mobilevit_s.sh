#!/usr/bin/env bash
# CLIP-KD baseline: MobileViT-S trained on CC3M+CC12M without a teacher (task loss only).
# Published ImageNet zero-shot top-1 (CLIP-KD README): 32.60.
# Usage: CC3M_CSV=... CC12M_CSV=... bash scripts/recipes/baseline_mobilevit_s.sh [more flags]
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_recipe baseline_mobilevit_s \
    --model timm-mobilevit_s \
    --recipe none \
    "$@"

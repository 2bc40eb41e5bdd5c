#!/usr/bin/env bash
# CLIP-KD: ViT-L/14 trained on LAION-400M (72.8), open_clip tag laion400m_e32 -> ViT-B/16, distilled on CC3M+CC12M.
# Published ImageNet zero-shot top-1 (CLIP-KD README): 57.5 (no-KD baseline 37.0).
# Usage: CC3M_CSV=... CC12M_CSV=... bash scripts/recipes/kd_laion_vitl14_vitb16.sh [more flags]
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_recipe kd_laion_vitl14_vitb16 \
    --model ViT-B-16 \
    --teacher ViT-L-14 --teacher-pretrained laion400m_e32 \
    --recipe clip-kd \
    "$@"

#!/usr/bin/env bash
# CLIP-KD: ViT-L/14 trained on LAION-400M (72.8), open_clip tag laion400m_e32 -> ViT-T/16, distilled on CC3M+CC12M.
# Published ImageNet zero-shot top-1 (CLIP-KD README): 40.9 (no-KD baseline 30.6).
# Usage: CC3M_CSV=... CC12M_CSV=... bash scripts/recipes/kd_laion_vitl14_vit_t16.sh [more flags]
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_recipe kd_laion_vitl14_vit_t16 \
    --model ViT-T-16 \
    --teacher ViT-L-14 --teacher-pretrained laion400m_e32 \
    --recipe clip-kd \
    "$@"

#!/usr/bin/env bash
# CLIP-KD: ViT-B/16 trained on CC3M+CC12M (36.99) -> MobileViT-S, distilled on CC3M+CC12M.
# Published ImageNet zero-shot top-1 (CLIP-KD README): 35.96 (no-KD baseline 32.60).
# Usage: CC3M_CSV=... CC12M_CSV=... TEACHER_CKPT=... bash scripts/recipes/kd_vitb16_mobilevit_s.sh [more flags]
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_recipe kd_vitb16_mobilevit_s \
    --model timm-mobilevit_s \
    --teacher ViT-B-16 --teacher-pretrained "${TEACHER_CKPT:?download https://github.com/winycg/CLIP-KD/releases/download/CLIP-KDv0.1/ViT_B_16_cc3m_12m_ep32.pt and set TEACHER_CKPT}" \
    --recipe clip-kd \
    "$@"

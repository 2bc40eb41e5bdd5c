#!/usr/bin/env bash
# CLIP-KD: ResNet-101 trained on CC3M+CC12M (36.76) -> MobileViT-S, distilled on CC3M+CC12M.
# Published ImageNet zero-shot top-1 (CLIP-KD README): 34.97 (no-KD baseline 32.60).
# Usage: CC3M_CSV=... CC12M_CSV=... TEACHER_CKPT=... bash scripts/recipes/kd_rn101_mobilevit_s.sh [more flags]
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_recipe kd_rn101_mobilevit_s \
    --model timm-mobilevit_s \
    --teacher RN101 --teacher-pretrained "${TEACHER_CKPT:?download https://github.com/winycg/CLIP-KD/releases/download/CLIP-KDv0.1/RN101_cc3m_12m_ep32.pt and set TEACHER_CKPT}" \
    --recipe clip-kd \
    "$@"

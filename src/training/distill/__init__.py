"""The distillation loss zoo: terms (plain functions), the spec language and presets, and `DistillLoss`.

    from training.distill import build_distill_loss
    loss_fn = build_distill_loss("task=1,crd=1,icl=1,fd=2000", student_dim=d_s, teacher_dim=d_t)
    out = loss_fn(student_image=s_v, student_text=s_t, student_scale=ls,
                  teacher_image=t_v, teacher_text=t_t, teacher_scale=lt)   # {term: weighted value, "total": sum}

Model-side helpers for `mfd`/`feat` (masked ViT forward, intermediate tokens) live in `training.distill.features`.
"""

from . import features, terms
from .features import (
    check_masking_supported,
    encode_image_with_options,
    encode_text_with_options,
    forward_features,
    resolve_feat_pairs,
)
from .loss import DistillLoss, build_distill_loss, distill_loss_from_args
from .spec import (
    PRESETS,
    TERMS,
    VALID_TERMS,
    DistillSpecError,
    FeatPair,
    ResolvedSpec,
    WeightSchedule,
    parse_feat_layers,
    parse_schedule,
    parse_spec,
    preset,
    resolve_spec,
)

__all__ = [
    "DistillLoss", "DistillSpecError", "FeatPair", "PRESETS", "ResolvedSpec", "TERMS", "VALID_TERMS",
    "WeightSchedule", "build_distill_loss", "distill_loss_from_args", "parse_feat_layers", "parse_schedule",
    "parse_spec", "preset", "resolve_spec", "terms", "features", "check_masking_supported",
    "encode_image_with_options", "encode_text_with_options", "forward_features", "resolve_feat_pairs",
]

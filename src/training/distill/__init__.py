"""The distillation loss zoo: terms (plain functions), their registry, the spec language and presets, `DistillLoss`.

    from training.distill import build_distill_loss
    loss_fn = build_distill_loss("task=1,crd=1,icl=1,fd=2000", student_dim=d_s, teacher_dim=d_t)
    out = loss_fn(student_image=s_v, student_text=s_t, student_scale=ls,
                  teacher_image=t_v, teacher_text=t_t, teacher_scale=lt)   # {term: weighted value, "total": sum}

A term is registered once in `registry.py` (what it needs, its parameters, its function). The model side of
`mfd`/`feat` (masked ViT forward, intermediate tokens) is tower surgery: `training.models.towers`.
"""

from ..errors import DistillSpecError
from . import features, registry, terms
from .features import resolve_feat_pairs
from .loss import DistillLoss, build_distill_loss, create_distill_loss
from .registry import REGISTRY, Param, Term, register
from .spec import (
    PRESETS,
    TERMS,
    VALID_TERMS,
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
    "DistillLoss", "DistillSpecError", "FeatPair", "PRESETS", "Param", "REGISTRY", "ResolvedSpec", "TERMS", "Term",
    "VALID_TERMS", "WeightSchedule", "build_distill_loss", "create_distill_loss", "features", "parse_feat_layers",
    "parse_schedule", "parse_spec", "preset", "register", "registry", "resolve_feat_pairs", "resolve_spec", "terms",
]

"""What the feat term needs to know of the models: its layer pairs (with token widths), resolved from --feat-layers.

The forwards that produce the tokens (and the mfd patch masking) are tower surgery: `training.models.towers`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

from ..errors import DistillSpecError
from ..models.towers import layer_index, tower_widths
from .spec import FeatPair, SpecError, parse_feat_layers

TOWERS = ("image", "text")


def default_pairs(depth_student: int, depth_teacher: int) -> list[tuple[int, int]]:
    """min(depths) evenly spaced pairs; the last layers are always paired."""
    n = min(depth_student, depth_teacher)
    return [(round((k + 1) * depth_student / n) - 1, round((k + 1) * depth_teacher / n) - 1) for k in range(n)]


def resolve_feat_pairs(student: nn.Module, teacher: nn.Module, spec: str | None = None,
                       towers: Sequence[str] | None = None) -> list[FeatPair]:
    """Layer pairs (with token widths) for `feat` from `--feat-layers` (see spec.parse_feat_layers) or evenly
    spaced defaults over both towers (towers a model cannot provide are skipped unless explicitly requested)."""
    parsed = parse_feat_layers(spec)
    explicit = parsed is not None
    use = list(parsed) if explicit else list(towers or TOWERS)
    pairs: list[FeatPair] = []
    for tower in use:
        if tower not in TOWERS:
            raise SpecError(f"feat: unknown tower '{tower}' (image, text)")
        try:
            s_w, t_w = tower_widths(student, tower), tower_widths(teacher, tower)
        except DistillSpecError:
            if explicit or towers:
                raise
            continue
        for s, t in (parsed[tower] if explicit else default_pairs(len(s_w), len(t_w))):
            s = layer_index(s, len(s_w), f"student {tower} tower")
            t = layer_index(t, len(t_w), f"teacher {tower} tower")
            pairs.append(FeatPair(tower, s, t, s_w[s], t_w[t]))
    if not pairs:
        raise SpecError("feat: no layer pairs could be resolved for these models")
    return pairs


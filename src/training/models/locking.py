"""--lock-image / --lock-text: freezing the student's towers, as open_clip_train does."""

from __future__ import annotations

import logging

import open_clip
from torch import nn

from ..config import ModelConfig
from ..errors import usage_error


def lock_towers(clip: nn.Module, model: ModelConfig) -> None:
    """--lock-image / --lock-text as in open_clip_train, with the model's own lock methods: locked parameters get
    requires_grad False, so the optimizer groups (main.param_groups) leave them out."""
    def lock(flag: str, what: str, tower: nn.Module, do) -> None:
        try:
            do()
        except Exception as exc:  # open_clip asserts / raises for towers it cannot (partially) lock
            raise usage_error(f"{flag}: cannot lock the student's {what} tower ({type(tower).__name__})", exc
                              ) from exc

    if model.lock_image:
        lock("--lock-image", "image", clip.visual, lambda: clip.lock_image_tower(
            unlocked_groups=model.lock_image_unlocked_groups, freeze_bn_stats=model.lock_image_freeze_bn_stats))
    if model.lock_text:
        # open_clip's CLIP always freezes LayerNorm with its layers (it asserts when asked not to)
        freeze_ln = model.lock_text_freeze_layer_norm or isinstance(clip, open_clip.CLIP)
        lock("--lock-text", "text", getattr(clip, "text", clip), lambda: clip.lock_text_tower(
            unlocked_layers=model.lock_text_unlocked_layers, freeze_layer_norm=freeze_ln))
    if model.lock_image or model.lock_text:
        params = list(clip.parameters())
        logging.info("locked student towers: %d of %d parameter tensors stay trainable",
                     sum(p.requires_grad for p in params), len(params))

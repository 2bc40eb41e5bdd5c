"""The student as the trainer runs it: one module (what DDP/FSDP wrap) whose forward gives the loss its inputs."""

from __future__ import annotations

import torch
from torch import nn

from .towers import forward_features


class StudentModel(nn.Module):
    """What DDP/FSDP wrap: one forward returns everything the loss needs (raw features, scale, extras).

    Masking (mfd) and intermediate tokens (feat) happen inside this single forward so gradient sync sees them.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip
        self.mask_ratio = 0.0
        self.image_layers: list[int] | None = None
        self.text_layers: list[int] | None = None

    def forward(self, image: torch.Tensor, text: torch.Tensor, mask_keys: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        return forward_features(self.clip, image, text, mask_ratio=self.mask_ratio if self.training else 0.0,
                                image_layers=self.image_layers, text_layers=self.text_layers, mask_keys=mask_keys)

"""The frozen teacher, one model or an ensemble."""

from __future__ import annotations

import torch
from torch import nn

from .towers import embed_dim, forward_features


class Teacher(nn.Module):
    """A frozen teacher (or an ensemble of them): eval mode, no grad, never wrapped in DDP."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.intermediate_layers: dict[str, list[int]] = {}
        self.intermediate_member = 0
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # a frozen teacher stays in eval mode whatever the trainer does
        return super().train(False)

    @property
    def embed_dims(self) -> list[int]:
        return [embed_dim(m) for m in self.members]

    @property
    def logit_biases(self) -> list[float | None]:
        """Each member's logit bias (SigLIP teachers), None for a member without one (CLIP)."""
        return [None if getattr(m, "logit_bias", None) is None else float(m.logit_bias) for m in self.members]

    def set_intermediate_layers(self, layers: dict[str, list[int]], member: int = 0) -> None:
        """Ask `member` for these layers' tokens ({"image": [...], "text": [...]}) on every forward (feat term)."""
        self.intermediate_layers, self.intermediate_member = layers, member

    @torch.no_grad()
    def forward(self, image: torch.Tensor, text: torch.Tensor | None) -> dict[str, list[torch.Tensor]]:
        """Per member: L2-normalised image (and, given `text`, text) features and exp(logit scale)."""
        layers = self.intermediate_layers
        out: dict = {"image_features": [], "text_features": [], "logit_scales": [], "logit_biases": []}
        for i, member in enumerate(self.members):
            wanted = layers if i == self.intermediate_member else {}
            f = forward_features(member, image, text, image_layers=wanted.get("image"),
                                 text_layers=wanted.get("text"))
            out["image_features"].append(torch.nn.functional.normalize(f["image_features"], dim=-1))
            if text is not None:  # image-only students: the text tower does not run
                out["text_features"].append(torch.nn.functional.normalize(f["text_features"], dim=-1))
            out["logit_scales"].append(f["logit_scale"].float())
            out["logit_biases"].append(f["logit_bias"].float() if "logit_bias" in f else None)
            if wanted:
                out["intermediates"] = {"image": f["image_intermediates"], "text": f.get("text_intermediates")}
        if text is None:
            out["text_features"] = None
        return out

"""Reading state dicts in every common checkpoint format, and loading them into open_clip models.

Loading is always weights_only, so untrusted files cannot run code.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from torch import nn

from ..errors import UsageError, usage_error


def is_local_path(pretrained: str | None) -> bool:
    """A weights file (to load ourselves, weights_only) rather than an open_clip pretrained tag."""
    return bool(pretrained) and (os.path.sep in pretrained or os.path.exists(pretrained)
                                 or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".npz")))


@contextlib.contextmanager
def quiet_random_init_warning():
    """open_clip warns "No pretrained weights loaded" when we build a model before loading a local file."""
    class _Drop(logging.Filter):
        def filter(self, record):
            return not str(record.getMessage()).startswith("No pretrained weights loaded")

    drop, root = _Drop(), logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors from a bare state_dict, {'state_dict': ...}, {'model': ...} (our checkpoints) or safetensors.

    A `module.` prefix (DDP) is stripped. Loading is weights_only, so untrusted files cannot run code.
    """
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            ckpt = load_file(path, device="cpu")
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise usage_error(f"cannot read checkpoint {path}", exc) from exc
    if isinstance(ckpt, dict):
        for key in ("state_dict", "model", "student"):
            if key in ckpt and isinstance(ckpt[key], dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not ckpt or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise UsageError(f"{path} holds no state_dict of tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in ckpt.items()}


def load_weights(model: nn.Module, path: str) -> None:
    """Load a local checkpoint into an open_clip model, with open_clip's own format conversions."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import resize_pos_embed, resize_text_pos_embed

    state_dict = convert_state_dict(model, read_state_dict(path))
    if "logit_scale" in state_dict and model.logit_scale.ndim != state_dict["logit_scale"].ndim:
        state_dict["logit_scale"] = state_dict["logit_scale"].reshape(model.logit_scale.shape)
    try:
        resize_pos_embed(state_dict, model)
        resize_text_pos_embed(state_dict, model)
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, AssertionError, KeyError) as exc:
        raise usage_error(f"{path} does not match the architecture", exc) from exc

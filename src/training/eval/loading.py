"""Model loading for evaluation: open_clip name or JSON config + a pretrained tag, a weights file, or a training
checkpoint (`{"model": student_state_dict, ...}`), always with weights_only=True.

Name resolution and weight loading are `training.models`' (one implementation for training and evaluation).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os

import open_clip
import torch

from ..errors import UsageError, usage_error
from ..models import load_weights, resolve_model_name


def is_local_path(pretrained: str | None) -> bool:
    return bool(pretrained) and (os.path.sep in pretrained or os.path.exists(pretrained)
                                 or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".npz")))


def model_id(arch: str, pretrained: str | None) -> str:
    """Stable id for caches: arch + tag, or arch + absolute checkpoint path + mtime + size."""
    if is_local_path(pretrained) and os.path.isfile(pretrained):
        st = os.stat(pretrained)
        raw = f"{arch}|{os.path.abspath(pretrained)}|{st.st_mtime_ns}|{st.st_size}"
    else:
        raw = f"{arch}|{pretrained or 'random-init'}"
    return f"{arch}-{hashlib.sha1(raw.encode()).hexdigest()[:12]}"


@contextlib.contextmanager
def _quiet_random_init_warning():
    """open_clip warns "No pretrained weights loaded" when we build the model before loading a local file."""
    class _Drop(logging.Filter):
        def filter(self, record):
            return not str(record.getMessage()).startswith("No pretrained weights loaded")

    drop, root = _Drop(), logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def load_model(arch: str, pretrained: str | None, device: torch.device):
    """(model in eval mode on device, preprocess_val, tokenizer, open_clip name)."""
    name = resolve_model_name(arch)
    local = is_local_path(pretrained)
    if local and not os.path.isfile(pretrained):
        raise UsageError(f"checkpoint not found: {pretrained}")
    try:
        with _quiet_random_init_warning() if local else contextlib.nullcontext():
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=None if local else (pretrained or None), device="cpu")
    except UsageError:
        raise
    except Exception as exc:
        raise usage_error(f"cannot create '{name}' with pretrained '{pretrained}'", exc) from exc
    if local:
        load_weights(model, pretrained)
    model = model.to(device).eval()
    return model, preprocess, open_clip.get_tokenizer(name), name

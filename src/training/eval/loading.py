"""Model loading for evaluation: open_clip name or JSON config + a pretrained tag, a weights file, or a training
checkpoint (`{"model": student_state_dict, ...}`), always with weights_only=True.

`training.models` (resolve_model_name, load_weights) is used when present; the small fallbacks below keep this
module working on its own and are the single place to swap.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os

import open_clip
import torch

from ..params import UsageError


def resolve_model_name(name: str) -> str:
    """An open_clip model name for `name` (a JSON config path is registered with open_clip on the fly)."""
    try:
        from ..models import resolve_model_name as project_resolve
    except ImportError:
        project_resolve = None
    if project_resolve is not None:
        return project_resolve(name)
    if name.endswith(".json"):
        if not os.path.isfile(name):
            raise UsageError(f"model config not found: {name}")
        open_clip.add_model_config(name)
        name = os.path.splitext(os.path.basename(name))[0]
    if name not in open_clip.list_models() and not name.startswith(("hf-hub:", "local-dir:")):
        raise UsageError(f"unknown model '{name}' (see open_clip.list_models())")
    return name


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            ckpt = load_file(path, device="cpu")
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot read checkpoint {path}: {msg}") from exc
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict"):
            if isinstance(ckpt.get(key), dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not ckpt or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise UsageError(f"{path} holds no state_dict of tensors")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in ckpt.items()}


def load_weights(model, path: str) -> None:
    try:
        from ..models import load_weights as project_load
    except ImportError:
        project_load = None
    if project_load is not None:
        project_load(model, path)
        return
    from open_clip.model import resize_pos_embed, resize_text_pos_embed

    sd = _read_state_dict(path)
    if "logit_scale" in sd and model.logit_scale.ndim != sd["logit_scale"].ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    resize_pos_embed(sd, model)
    resize_text_pos_embed(sd, model)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise UsageError(f"{path} does not match the architecture: {str(exc).splitlines()[0]}") from exc


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
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot create '{name}' with pretrained '{pretrained}': {msg}") from exc
    if local:
        load_weights(model, pretrained)
    model = model.to(device).eval()
    return model, preprocess, open_clip.get_tokenizer(name), name

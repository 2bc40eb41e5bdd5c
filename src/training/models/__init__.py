"""The models on open_clip: the factory (`create_student`, `create_teacher`, `create_clip`) and what it builds.

- `weights`: reading state dicts in every common checkpoint format (always weights_only) and loading them;
- `locking`: --lock-image / --lock-text;
- `towers`: tower surgery (patch masking, intermediate-layer tokens) in one forward;
- `student` / `teacher`: the modules the trainer runs.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
from dataclasses import dataclass

import open_clip
import torch
from torch import nn

from ..config import ModelConfig, TeacherConfig
from ..data.transforms import ImageFormat
from ..errors import UsageError, usage_error
from ..pretrained import resolve as resolve_pretrained
from .locking import lock_towers
from .student import StudentModel
from .teacher import Teacher
from .towers import embed_dim
from .weights import is_local_path, load_weights, quiet_random_init_warning, read_state_dict

__all__ = ["CLIPKD_MODEL_NAMES", "ModelBundle", "StudentModel", "Teacher", "check_model_config", "create_clip", "create_student",
           "create_teacher", "embed_dim", "load_weights", "lock_towers", "read_state_dict", "resolve_model_name"]

CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
# CLIP-KD's model config names -> this project's configs of the same architectures (CLIP-KD's released checkpoints
# of these students load into them; see pretrained/registry.csv)
CLIPKD_MODEL_NAMES = {"timm_resnet18": "timm-resnet18", "timm_mobilenetv3_small_100": "timm-mobilenetv3_small_100",
                      "timm-efficientnet-b0": "timm-efficientnet_b0"}


def check_model_config(path: str) -> None:
    """Raise a one-line UsageError naming `path` unless it is a readable open_clip model config.

    Checked before open_clip sees the file: open_clip keeps every added path and re-reads them all on each later
    add, so a bad file would break every later registration; a file lacking keys would be skipped silently and its
    name could resolve to a shipped config of the same name."""
    if not os.path.exists(path):
        raise UsageError(f"model config not found: {path}")
    if not os.path.isfile(path):
        raise UsageError(f"model config {path} is not a file")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as exc:
        raise UsageError(f"model config {path} is not valid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})"
                         ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read model config {path}: {exc}") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"model config {path} is not an open_clip model config: expected a JSON object, "
                         f"got {type(cfg).__name__}")
    missing = [k for k in CONFIG_KEYS if k not in cfg]
    if missing:
        raise UsageError(f"model config {path} lacks {', '.join(missing)} (an open_clip model config needs "
                         f"{', '.join(CONFIG_KEYS)})")
    for key in ("vision_cfg", "text_cfg"):
        if not isinstance(cfg[key], dict):
            raise UsageError(f"model config {path}: {key} must be an object, got {type(cfg[key]).__name__}")
    if isinstance(cfg["embed_dim"], bool) or not isinstance(cfg["embed_dim"], int) or cfg["embed_dim"] < 1:
        raise UsageError(f"model config {path}: embed_dim must be a positive integer, got {cfg['embed_dim']!r}")


def resolve_model_name(name: str) -> str:
    """An open_clip model name for `name`: a known config, or a JSON config path registered on the fly."""
    if name.endswith(".json"):
        check_model_config(name)
        open_clip.add_model_config(name)  # every rank calls this, so all ranks know the architecture
        return os.path.splitext(os.path.basename(name))[0]
    if name.startswith(("hf-hub:", "local-dir:")) or name in open_clip.list_models():
        return name
    if name in CLIPKD_MODEL_NAMES:
        logging.info("model %s: CLIP-KD's name for %s", name, CLIPKD_MODEL_NAMES[name])
        return CLIPKD_MODEL_NAMES[name]
    close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else " (see open_clip.list_models())"
    raise UsageError(f"unknown model '{name}'{hint}")


def create_clip(name: str, pretrained: str | None, device: torch.device, **kwargs) -> nn.Module:
    """An open_clip model; `pretrained` is a local file or an open_clip pretrained tag (downloaded by open_clip)."""
    arch = resolve_model_name(name)
    pretrained = resolve_pretrained(pretrained, arch)  # a registry name -> its cached file (training.pretrained)
    local = is_local_path(pretrained)
    if local and not os.path.isfile(pretrained):
        raise UsageError(f"checkpoint not found: {pretrained}")
    try:
        with quiet_random_init_warning() if local else contextlib.nullcontext():
            model = open_clip.create_model(arch, pretrained=None if local else (pretrained or None), device="cpu",
                                           **kwargs)
    except UsageError:
        raise
    except Exception as exc:
        raise usage_error(f"cannot create '{arch}' with pretrained '{pretrained}'", exc) from exc
    if local:
        load_weights(model, pretrained)
    model.arch_name = arch
    return model.to(device)


@dataclass
class ModelBundle:
    model: nn.Module
    image_format: ImageFormat
    tokenizer: object
    context_length: int


def _bundle(model: nn.Module) -> ModelBundle:
    tokenizer = open_clip.get_tokenizer(model.arch_name)
    return ModelBundle(model, ImageFormat.from_model(model), tokenizer,
                       int(getattr(tokenizer, "context_length", getattr(model, "context_length", 77))))


def create_student(model: ModelConfig, device: torch.device, low_precision: str | None = None) -> ModelBundle:
    """low_precision "bf16": built the way open_clip builds --precision bf16 (bf16 weights, fp32 LayerNorms and
    logit scale); for the engines that do not cast the weights themselves (DDP, Horovod)."""
    kwargs = {}
    if model.force_image_size:
        kwargs["force_image_size"] = model.force_image_size
    if model.force_patch_dropout is not None:  # FLIP: open_clip's PatchDropout, active in training mode only
        kwargs["force_patch_dropout"] = model.force_patch_dropout
    for flag in ("force_quick_gelu", "force_custom_text", "pretrained_image"):
        if getattr(model, flag):
            kwargs[flag] = True
    if model.cache_dir:
        kwargs["cache_dir"] = model.cache_dir
    if low_precision:
        kwargs["precision"] = low_precision
    clip = create_clip(model.model, model.pretrained, device, **kwargs)
    lock_towers(clip, model)
    if model.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    return _bundle(clip)


def create_teacher(teacher: TeacherConfig, device: torch.device, precision: str | None, cache_dir: str | None = None
                   ) -> tuple[Teacher, ModelBundle] | tuple[None, None]:
    """The frozen teacher and its input format, its weights cast for --precision bf16/fp16. Ensemble members must
    share image format and tokenizer. `cache_dir`: open_clip's download folder of pretrained tags (--cache-dir)."""
    names, weights = teacher.models, teacher.weights
    if not names:
        return None, None
    if len(weights) != len(names):
        raise UsageError(f"--teacher lists {len(names)} models but --teacher-pretrained lists {len(weights)}")
    extra = {"cache_dir": cache_dir} if cache_dir else {}
    members = [create_clip(name, w, device, **extra) for name, w in zip(names, weights)]
    for name, w in zip(names, weights):
        if not w:
            logging.warning("teacher %s has no --teacher-pretrained weights: it is randomly initialised", name)
    bundles = [_bundle(m) for m in members]
    for b in bundles[1:]:
        if b.image_format != bundles[0].image_format or b.context_length != bundles[0].context_length:
            raise UsageError("teacher ensemble members must share image size, mean/std and context length")
    frozen = Teacher(members)
    if precision in ("bf16", "fp16"):
        frozen.to(torch.bfloat16 if precision == "bf16" else torch.float16)
    return frozen, bundles[0]

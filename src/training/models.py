"""Student and teacher construction on open_clip, plus weight loading in every common checkpoint format.

`create_student` / `create_teacher` are the two entries. Weights always load with weights_only=True.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from dataclasses import dataclass

import open_clip
import torch
from torch import nn

from .data.transforms import ImageFormat
from .errors import UsageError, first_line

CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


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
    close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else " (see open_clip.list_models())"
    raise UsageError(f"unknown model '{name}'{hint}")


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
        raise UsageError(f"cannot read checkpoint {path}: {first_line(exc)}") from exc
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
        raise UsageError(f"{path} does not match the architecture: {str(exc).splitlines()[0]}") from exc


def create_clip(name: str, pretrained: str | None, device: torch.device, **kwargs) -> nn.Module:
    """An open_clip model; `pretrained` is a local file or an open_clip pretrained tag (downloaded by open_clip)."""
    arch = resolve_model_name(name)
    local = bool(pretrained) and (os.path.sep in pretrained or os.path.exists(pretrained))
    try:
        model = open_clip.create_model(arch, pretrained=None if local else (pretrained or None), device="cpu",
                                       **kwargs)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"cannot create '{arch}' with pretrained '{pretrained}': {first_line(exc)}") from exc
    if local:
        load_weights(model, pretrained)
    model.arch_name = arch
    return model.to(device)


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
        from .distill.features import forward_features

        return forward_features(self.clip, image, text, mask_ratio=self.mask_ratio if self.training else 0.0,
                                image_layers=self.image_layers, text_layers=self.text_layers, mask_keys=mask_keys)


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


def lock_towers(clip: nn.Module, args) -> None:
    """--lock-image / --lock-text as in open_clip_train, with the model's own lock methods: locked parameters get
    requires_grad False, so the optimizer groups (main.param_groups) leave them out."""
    def lock(flag: str, what: str, tower: nn.Module, do) -> None:
        try:
            do()
        except Exception as exc:  # open_clip asserts / raises for towers it cannot (partially) lock
            raise UsageError(f"{flag}: cannot lock the student's {what} tower ({type(tower).__name__}): "
                             f"{first_line(exc)}") from exc

    if args.lock_image:
        lock("--lock-image", "image", clip.visual, lambda: clip.lock_image_tower(
            unlocked_groups=args.lock_image_unlocked_groups, freeze_bn_stats=args.lock_image_freeze_bn_stats))
    if args.lock_text:
        # open_clip's CLIP always freezes LayerNorm with its layers (it asserts when asked not to)
        freeze_ln = args.lock_text_freeze_layer_norm or isinstance(clip, open_clip.CLIP)
        lock("--lock-text", "text", getattr(clip, "text", clip), lambda: clip.lock_text_tower(
            unlocked_layers=args.lock_text_unlocked_layers, freeze_layer_norm=freeze_ln))
    if args.lock_image or args.lock_text:
        params = list(clip.parameters())
        logging.info("locked student towers: %d of %d parameter tensors stay trainable",
                     sum(p.requires_grad for p in params), len(params))


def create_student(args, device: torch.device, low_precision: str | None = None) -> ModelBundle:
    """low_precision "bf16": built the way open_clip builds --precision bf16 (bf16 weights, fp32 LayerNorms and
    logit scale); for the engines that do not cast the weights themselves (DDP, Horovod)."""
    kwargs = {}
    if args.force_image_size:
        kwargs["force_image_size"] = args.force_image_size
    if low_precision:
        kwargs["precision"] = low_precision
    clip = create_clip(args.model, args.pretrained, device, **kwargs)
    lock_towers(clip, args)
    if args.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    return _bundle(clip)


class Teacher(nn.Module):
    """A frozen teacher (or an ensemble of them): eval mode, no grad, never wrapped in DDP."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # a frozen teacher stays in eval mode whatever the trainer does
        return super().train(False)

    @property
    def embed_dims(self) -> list[int]:
        return [embed_dim(m) for m in self.members]

    def set_intermediate_layers(self, layers: dict[str, list[int]], member: int = 0) -> None:
        """Ask `member` for these layers' tokens ({"image": [...], "text": [...]}) on every forward (feat term)."""
        self.intermediate_layers, self.intermediate_member = layers, member

    @torch.no_grad()
    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        from .distill.features import forward_features

        layers = getattr(self, "intermediate_layers", None) or {}
        out: dict = {"image_features": [], "text_features": [], "logit_scales": []}
        for i, member in enumerate(self.members):
            wanted = layers if i == getattr(self, "intermediate_member", 0) else {}
            f = forward_features(member, image, text, image_layers=wanted.get("image"),
                                 text_layers=wanted.get("text"))
            out["image_features"].append(torch.nn.functional.normalize(f["image_features"], dim=-1))
            out["text_features"].append(torch.nn.functional.normalize(f["text_features"], dim=-1))
            out["logit_scales"].append(f["logit_scale"].float())
            if wanted:
                out["intermediates"] = {"image": f["image_intermediates"], "text": f["text_intermediates"]}
        return out


def embed_dim(model: nn.Module) -> int:
    """Output width of an open_clip model (one tiny text forward: every architecture answers it the same way)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        tokens = torch.zeros(1, int(getattr(model, "context_length", 77)), dtype=torch.long, device=device)
        return int(model.encode_text(tokens).shape[-1])


def create_teacher(args, device: torch.device) -> tuple[Teacher, ModelBundle] | tuple[None, None]:
    """The frozen teacher and its input format. Ensemble members must share image format and tokenizer."""
    names = args.teacher_list
    if not names:
        return None, None
    weights = args.teacher_pretrained_list or [""] * len(names)
    if len(weights) != len(names):
        raise UsageError(f"--teacher lists {len(names)} models but --teacher-pretrained lists {len(weights)}")
    members = [create_clip(name, w, device) for name, w in zip(names, weights)]
    for name, w in zip(names, weights):
        if not w:
            logging.warning("teacher %s has no --teacher-pretrained weights: it is randomly initialised", name)
    bundles = [_bundle(m) for m in members]
    for b in bundles[1:]:
        if b.image_format != bundles[0].image_format or b.context_length != bundles[0].context_length:
            raise UsageError("teacher ensemble members must share image size, mean/std and context length")
    teacher = Teacher(members)
    if args.precision in ("bf16", "fp16"):
        teacher.to(torch.bfloat16 if args.precision == "bf16" else torch.float16)
    return teacher, bundles[0]

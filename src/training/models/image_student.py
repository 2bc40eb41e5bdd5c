"""Image-only students (`--student-kind image`) and classifiers (`--student-kind classifier`): no text tower.

    trunk (a timm model, or an open_clip image tower) -> `proj`
      image:      proj = Linear(features, teacher embedding width): regresses the teacher's image embedding (emb);
                  the zero-shot head (class embeddings from the teacher's text tower, and its logit scale) is a
                  buffer, so the student classifies with no teacher and no tokenizer.
      classifier: proj = Linear(features, num_classes): the class logits, trained on the teacher's class logits.

`forward(image)` gives class logits when the student has a head, else the embedding; `encode_image` gives what a
linear probe reads (the embedding, or a classifier's pre-logit features). The class names are stored as a UTF-8
buffer, so a state_dict (checkpoint, .safetensors export, ONNX metadata) carries everything needed to predict.

`--model` names the trunk: an open_clip model or config (`timm-resnet18`, `tiny-student`, a JSON path: its image
tower is taken, the text tower dropped), else any timm architecture (`resnet18`, `mobilenetv3_small_100`, ...).
"""

from __future__ import annotations

import difflib
import math

import open_clip
import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import ImageFormat
from ..errors import UsageError

KINDS = ("image", "classifier")


class ClassHeadError(UsageError):
    """A class head that does not fit the student (width, class count, names)."""


def encode_names(names: list[str]) -> torch.Tensor:
    return torch.tensor(list("\n".join(names).encode("utf-8")), dtype=torch.uint8)


def decode_names(buffer: torch.Tensor) -> list[str]:
    return bytes(buffer.tolist()).decode("utf-8").split("\n") if buffer.numel() else []


class ImageStudent(nn.Module):
    """See the module docstring. `kind` is "image" or "classifier"; `out_dim` the embedding width (image) or the
    number of classes (classifier)."""

    def __init__(self, trunk: nn.Module, feature_dim: int, out_dim: int, kind: str, image_format: ImageFormat,
                 arch: str, num_classes: int = 0):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown image student kind {kind!r} ({', '.join(KINDS)})")
        self.kind, self.arch, self.image_format = kind, arch, image_format
        self.trunk = trunk
        self.proj = nn.Linear(feature_dim, out_dim)
        self.embed_dim = out_dim if kind == "image" else feature_dim
        # the zero-shot head (image kind): rows L2-normalised, in the embedding space; logit scale in log space
        self.register_buffer("class_embeddings", torch.zeros(num_classes if kind == "image" else 0, out_dim))
        self.register_buffer("logit_scale", torch.zeros(()))
        self.register_buffer("class_names_utf8", torch.zeros(0, dtype=torch.uint8))
        if kind == "classifier":
            self.class_names_utf8 = encode_names([str(i) for i in range(out_dim)])

    # ---- the head ---------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.proj.out_features if self.kind == "classifier" else self.class_embeddings.shape[0]

    @property
    def has_head(self) -> bool:
        return self.num_classes > 0

    @property
    def classnames(self) -> list[str]:
        return decode_names(self.class_names_utf8)

    def set_class_names(self, names: list[str]) -> None:
        if len(names) != self.num_classes:
            raise ClassHeadError(f"{len(names)} class names for a head of {self.num_classes} classes")
        self.class_names_utf8 = encode_names(list(names))

    @torch.no_grad()
    def set_class_head(self, embeddings: torch.Tensor, names: list[str], logit_scale: float) -> None:
        """Install the zero-shot head: [C, D] class embeddings (D = this student's embedding width)."""
        if self.kind != "image":
            raise ClassHeadError("a classifier student's head is its trained output layer; a zero-shot class head "
                                 "fits --student-kind image students only")
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embed_dim:
            raise ClassHeadError(f"class head of shape {tuple(embeddings.shape)} does not match the student: its "
                                 f"embeddings are {self.embed_dim} wide (expected [C, {self.embed_dim}])")
        if len(names) != embeddings.shape[0]:
            raise ClassHeadError(f"class head has {embeddings.shape[0]} rows but {len(names)} class names")
        device = self.proj.weight.device
        self.class_embeddings = F.normalize(embeddings.float(), dim=-1).to(device)
        self.logit_scale = torch.tensor(math.log(float(logit_scale)), device=device)
        self.class_names_utf8 = encode_names(list(names))

    # ---- forwards ---------------------------------------------------------------------------------------------
    def features(self, image: torch.Tensor) -> torch.Tensor:
        return self.trunk(image)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        feats = self.features(image)
        out = self.proj(feats) if self.kind == "image" else feats
        return F.normalize(out, dim=-1) if normalize else out

    def classify(self, image: torch.Tensor) -> torch.Tensor:
        """Class logits [B, C]: the classifier's output layer, or scale * cos(embedding, class embedding)."""
        if self.kind == "classifier":
            return self.proj(self.features(image))
        if not self.has_head:
            raise ClassHeadError("this image student has no class head (train with --zeroshot-data or a class "
                                 "folder, or pass one with --head)")
        emb = F.normalize(self.encode_image(image), dim=-1)
        return self.logit_scale.exp() * emb @ self.class_embeddings.to(emb.dtype).T

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classify(image) if self.has_head else self.encode_image(image)


# ---- building -------------------------------------------------------------------------------------------------------

def _timm_format(model: nn.Module, force_size: int | None) -> ImageFormat:
    cfg = timm.data.resolve_data_config({}, model=model)
    size = force_size or int(cfg["input_size"][-1])
    interp = cfg.get("interpolation", "bicubic")
    return ImageFormat(size=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                       interpolation=interp if interp in ("bicubic", "bilinear", "nearest") else "bicubic")


def _open_clip_trunk(name: str, pretrained: str, force_size: int | None, device) -> tuple[nn.Module, int, ImageFormat]:
    from . import create_clip

    kwargs = {"force_image_size": force_size} if force_size else {}
    clip = create_clip(name, pretrained, torch.device("cpu"), **kwargs)
    fmt = ImageFormat.from_model(clip)
    visual = clip.visual
    with torch.no_grad():
        width = int(visual(torch.zeros(1, 3, fmt.size, fmt.size)).shape[-1])
    return visual, width, fmt


def _timm_trunk(name: str, pretrained: str, force_size: int | None, num_classes: int = 0
                ) -> tuple[nn.Module, int, ImageFormat]:
    from .weights import load_weights

    trunk = timm.create_model(name, pretrained=False, num_classes=num_classes)
    if pretrained:
        load_weights(trunk, pretrained)  # a local file (timm's hub downloads are not used: offline by design)
    return trunk, int(trunk.num_features), _timm_format(trunk, force_size)


def is_open_clip_name(name: str) -> bool:
    return name.endswith(".json") or name.startswith(("hf-hub:", "local-dir:")) or name in open_clip.list_models()


def create_image_student(name: str, kind: str, out_dim: int, *, pretrained: str = "", force_image_size: int | None
                         = None, num_classes: int = 0, device: torch.device | str = "cpu") -> ImageStudent:
    """An ImageStudent with trunk `name` (see the module docstring). image: `out_dim` = the teacher's embedding
    width, `num_classes` = rows of the zero-shot head (0: none yet); classifier: `out_dim` = the number of classes."""
    if is_open_clip_name(name):
        trunk, width, fmt = _open_clip_trunk(name, pretrained, force_image_size, device)
    elif timm.is_model(name):
        trunk, width, fmt = _timm_trunk(name, pretrained, force_image_size)
    else:
        close = difflib.get_close_matches(name, open_clip.list_models() + timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UsageError(f"unknown image student '{name}': neither an open_clip model/config nor a timm "
                         f"architecture{hint}")
    return ImageStudent(trunk, width, out_dim, kind, fmt, name, num_classes).to(device)


def image_student_from_state(record: dict, state: dict[str, torch.Tensor], device="cpu") -> ImageStudent:
    """Rebuild the student a checkpoint or export holds: `record` is its flat args record (model, student_kind,
    force_image_size), `state` its state_dict (widths and head size are read from the tensors)."""
    kind = record.get("student_kind", "clip")
    if kind not in KINDS:
        raise UsageError(f"not an image-only student (student_kind {kind!r})")
    if "proj.weight" not in state:
        raise UsageError("the state dict has no proj.weight: not an image student")
    out_dim = int(state["proj.weight"].shape[0])
    rows = int(state["class_embeddings"].shape[0]) if "class_embeddings" in state else 0
    student = create_image_student(record["model"], kind, out_dim, force_image_size=record.get("force_image_size"),
                                   num_classes=rows)
    if "class_embeddings" in state and state["class_embeddings"].shape[1:] != student.class_embeddings.shape[1:]:
        raise ClassHeadError(f"class head of shape {tuple(state['class_embeddings'].shape)} does not match the "
                             f"student (embedding width {student.embed_dim})")
    student.class_names_utf8 = state.get("class_names_utf8", student.class_names_utf8).clone()
    try:
        student.load_state_dict(state)
    except RuntimeError as exc:
        raise UsageError(f"the weights do not fit {record['model']} ({kind}): {str(exc).splitlines()[0]}") from None
    return student.to(device)


def student_record(student: ImageStudent) -> dict:
    """What `image_student_from_state` needs besides the state_dict (stored with every export)."""
    return {"model": student.arch, "student_kind": student.kind, "force_image_size": student.image_format.size}


# ---- files: training checkpoints and exports ------------------------------------------------------------------------
EXPORT_KEY = "image_student"  # the record's key in an exported .pt, and its safetensors metadata key


def read_image_student(path: str) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(record, state_dict) when `path` holds an image-only student (a training checkpoint of --student-kind
    image/classifier, or its export), else None (a CLIP checkpoint: the caller loads it as one). weights_only."""
    import json
    import os

    from ..errors import usage_error

    if not os.path.isfile(path):
        raise UsageError(f"checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(path, "pt") as f:
                meta = (f.metadata() or {}).get(EXPORT_KEY)
            return (json.loads(meta), load_file(path)) if meta else None
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one line
        raise usage_error(f"cannot read checkpoint {path}", exc) from exc
    if not isinstance(ckpt, dict):
        return None
    if isinstance(ckpt.get(EXPORT_KEY), dict) and isinstance(ckpt.get("state_dict"), dict):
        return ckpt[EXPORT_KEY], ckpt["state_dict"]
    args = ckpt.get("args")
    if isinstance(args, dict) and args.get("student_kind") in KINDS and isinstance(ckpt.get("model"), dict):
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in ckpt["model"].items()}
        return args, state
    return None


def load_image_student(path: str, device="cpu") -> ImageStudent | None:
    found = read_image_student(path)
    return image_student_from_state(found[0], found[1], device) if found else None


def save_image_student(student: ImageStudent, out: str) -> None:
    """A student-only file (.pt, or .safetensors with the record as metadata), atomically."""
    import json

    from ..fileio import atomic_path, torch_save

    state = {k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()}
    if out.endswith(".safetensors"):
        from safetensors.torch import save_file

        with atomic_path(out) as tmp:
            save_file(state, tmp, metadata={EXPORT_KEY: json.dumps(student_record(student))})
    else:
        torch_save({EXPORT_KEY: student_record(student), "state_dict": state}, out)

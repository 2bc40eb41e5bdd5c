"""Weight inheritance (TinyCLIP, DistillCLIP): a smaller student ViT / text-transformer CLIP initialised from its
teacher's weights (`--init-from-teacher`).

- Depth: student layer i of a tower copies teacher layer `layers[i]`, where `layers` comes from a layer spec:
  `auto` (evenly spaced: floor(i * L_teacher / L_student), = every K-th when L_teacher = K * L_student),
  `every:K` (teacher layers 0, K, 2K, ...), or an explicit list `0,3,7` (increasing, one per student layer).
- Width: every tensor is the leading slice of its teacher counterpart along each dimension. Attention is sliced per
  head: the fused `in_proj_weight` [3*H*d, W] is cut as q, k, v, each [H, d, W] -> [:H_s, :d_s, :W_s], and re-fused;
  `out_proj.weight`'s input dimension is cut the same way per head.
- Some dimensions must agree exactly, or the copy would mean something else: the patch embedding's kernel and input
  channels, the number of image tokens (image size / patch size), the vocabulary.

Everything else (embeddings, positional embeddings, class token, projections, norms, logit scale) is a leading slice
or an exact copy. A tensor that cannot be inherited raises `InheritanceError` (one line, naming the tensor).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from open_clip.transformer import TextTransformer, Transformer, VisionTransformer
from torch import nn

from ..config import ModelConfig, TeacherConfig
from ..errors import UsageError
from .towers import describe_tower, unwrap

log = logging.getLogger(__name__)

TOWERS = ("image", "text")
# the blocks of each tower in a state dict: CLIP's text tower sits at the root, CustomTextCLIP's under `text.`
_BLOCK_KEY = re.compile(r"^(visual\.transformer\.resblocks|text\.transformer\.resblocks|transformer\.resblocks)"
                        r"\.(\d+)\.(.+)$")
# dimensions that must be equal, and why (a leading slice there would change what the tensor means)
_EXACT_DIMS = ((re.compile(r"^visual\.conv1\.weight$"), (1, 2, 3), "the patch size and input channels must agree"),
               (re.compile(r"^visual\.positional_embedding$"), (0,),
                "the number of image tokens (image size / patch size) must agree"),
               (re.compile(r"(^|\.)token_embedding\.weight$"), (0,), "the vocabulary must agree"))


class InheritanceError(UsageError):
    """A student that cannot be initialised from this teacher (one line, naming the tensor or tower)."""

    def __init__(self, message: str):
        super().__init__("--init-from-teacher: " + " ".join(str(message).split()))


# ---- layer specs ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerSpec:
    kind: str  # "auto" | "every" | "list"
    every: int = 0
    layers: tuple[int, ...] = ()


def parse_layer_spec(spec: str | None) -> LayerSpec:
    """`auto` (also None/''), `every:K` (K >= 1) or a comma list of teacher layer indices; ValueError otherwise."""
    text = (spec or "auto").strip()
    if text == "auto":
        return LayerSpec("auto")
    match = re.fullmatch(r"every:(\d+)", text)
    if match:
        k = int(match.group(1))
        if k < 1:
            raise ValueError(f"every:K needs K >= 1, got {text!r}")
        return LayerSpec("every", every=k)
    items = [v.strip() for v in text.split(",")]
    if not items or not all(re.fullmatch(r"\d+", v) for v in items):
        raise ValueError(f"expected auto, every:K or a comma list of teacher layer indices such as 0,2,5; got {text!r}")
    layers = tuple(int(v) for v in items)
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"the teacher layers must be increasing, got {text!r}")
    return LayerSpec("list", layers=layers)


def choose_layers(spec: str | None, teacher_depth: int, student_depth: int, tower: str = "image") -> list[int]:
    """The teacher layer that each of the student's `student_depth` layers of `tower` copies."""
    parsed = parse_layer_spec(spec)
    where = f"the {tower} tower"
    if parsed.kind == "auto":
        if student_depth > teacher_depth:
            raise InheritanceError(f"{where}: the student has {student_depth} layers, the teacher only {teacher_depth}")
        return [i * teacher_depth // student_depth for i in range(student_depth)]
    layers = list(range(0, teacher_depth, parsed.every)) if parsed.kind == "every" else list(parsed.layers)
    if parsed.kind == "list" and layers[-1] >= teacher_depth:
        raise InheritanceError(f"{where}: teacher layer {layers[-1]} does not exist (the teacher has {teacher_depth} "
                               f"layers, 0..{teacher_depth - 1})")
    if len(layers) != student_depth:
        raise InheritanceError(f"{where}: '{spec}' keeps {len(layers)} of the teacher's {teacher_depth} layers "
                               f"({','.join(map(str, layers))}) but the student has {student_depth}")
    return layers


# ---- the towers -------------------------------------------------------------------------------------------------

def _text_blocks(model: nn.Module) -> Transformer | None:
    if isinstance(getattr(model, "text", None), TextTransformer):
        return model.text.transformer
    if isinstance(getattr(model, "transformer", None), Transformer) and hasattr(model, "token_embedding"):
        return model.transformer
    return None


def check_family(model: nn.Module, who: str) -> None:
    """Refuse (one line) a model whose towers are not open_clip's VisionTransformer and text Transformer."""
    model = unwrap(model)
    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise InheritanceError(f"the {who}'s image tower is {describe_tower(visual) if visual is not None else 'absent'}"
                               "; only ViT / text-transformer CLIPs (open_clip VisionTransformer and Transformer) "
                               "can be inherited")
    if _text_blocks(model) is None:
        text = getattr(model, "text", None)
        raise InheritanceError(f"the {who}'s text tower is {type(text).__name__ if text is not None else 'absent'}; "
                               "only open_clip's text Transformer can be inherited")


def depths(model: nn.Module) -> dict[str, int]:
    model = unwrap(model)
    return {"image": len(model.visual.transformer.resblocks), "text": len(_text_blocks(model).resblocks)}


def attention_heads(model: nn.Module) -> dict[str, int]:
    """{module name: number of heads} of every attention module holding a fused in_proj."""
    return {name: int(m.num_heads) for name, m in unwrap(model).named_modules()
            if getattr(m, "in_proj_weight", None) is not None and hasattr(m, "num_heads")}


# ---- the state dict -------------------------------------------------------------------------------------------

def teacher_key(key: str, layers: dict[str, list[int]]) -> str:
    """The teacher tensor that student tensor `key` inherits from (its block index mapped through `layers`)."""
    match = _BLOCK_KEY.match(key)
    if not match:
        return key
    blocks, index, rest = match.groups()
    tower = "image" if blocks.startswith("visual.") else "text"
    return f"{blocks}.{layers[tower][int(index)]}.{rest}"


def _shape(t: torch.Tensor | torch.Size) -> str:
    return "(" + ", ".join(map(str, tuple(t))) + ")"


def _leading(key: str, source: torch.Tensor, target_shape: torch.Size, exact: tuple[int, ...] = (), why: str = ""
             ) -> torch.Tensor:
    if source.ndim != len(target_shape):
        raise InheritanceError(f"cannot inherit {key}: student shape {_shape(target_shape)} vs teacher "
                               f"{_shape(source.shape)} (different number of dimensions)")
    for dim, (s, t) in enumerate(zip(target_shape, source.shape)):
        if dim in exact and s != t:
            raise InheritanceError(f"cannot inherit {key}: student shape {_shape(target_shape)} vs teacher "
                                   f"{_shape(source.shape)} ({why})")
        if s > t:
            raise InheritanceError(f"cannot inherit {key}: student shape {_shape(target_shape)} exceeds the teacher's "
                                   f"{_shape(source.shape)} in dimension {dim}")
    return source[tuple(slice(0, s) for s in target_shape)]


def _per_head(key: str, source: torch.Tensor, target_shape: torch.Size, heads_s: int, heads_t: int) -> torch.Tensor:
    """Slice a fused qkv (in_proj weight [3*H*d, W] or bias [3*H*d]) or an out_proj weight [W, H*d] per head."""
    out_proj = key.endswith("out_proj.weight")
    rows_s, rows_t = (target_shape[1], source.shape[1]) if out_proj else (target_shape[0], source.shape[0])
    parts = 1 if out_proj else 3
    if rows_s % (parts * heads_s) or rows_t % (parts * heads_t):
        raise InheritanceError(f"cannot inherit {key}: student shape {_shape(target_shape)} / teacher "
                               f"{_shape(source.shape)} do not split into {heads_s} / {heads_t} heads")
    d_s, d_t = rows_s // (parts * heads_s), rows_t // (parts * heads_t)
    if heads_s > heads_t or d_s > d_t:
        raise InheritanceError(f"cannot inherit {key}: the student has {heads_s} heads of width {d_s}, the teacher "
                               f"{heads_t} of width {d_t}")
    if out_proj:  # [W_out, H*d]
        width_s, width_t = target_shape[0], source.shape[0]
        if width_s > width_t:
            raise InheritanceError(f"cannot inherit {key}: student shape {_shape(target_shape)} exceeds the "
                                   f"teacher's {_shape(source.shape)} in dimension 0")
        return source.reshape(width_t, heads_t, d_t)[:width_s, :heads_s, :d_s].reshape(width_s, heads_s * d_s)
    if source.ndim == 1:  # in_proj_bias [3*H*d]
        return source.reshape(3, heads_t, d_t)[:, :heads_s, :d_s].reshape(-1)
    width_s, width_t = target_shape[1], source.shape[1]
    if width_s > width_t:
        raise InheritanceError(f"cannot inherit {key}: student shape {_shape(target_shape)} exceeds the teacher's "
                               f"{_shape(source.shape)} in dimension 1")
    q_k_v = source.reshape(3, heads_t, d_t, width_t)[:, :heads_s, :d_s, :width_s]
    return q_k_v.reshape(3 * heads_s * d_s, width_s)


def inherit_state_dict(teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor],
                       layers: dict[str, list[int]], teacher_heads: dict[str, int], student_heads: dict[str, int]
                       ) -> dict[str, torch.Tensor]:
    """The student's state dict taken from the teacher's: every student key, shaped as in `student`.

    `layers` maps each tower ("image", "text") to the teacher layer of every student layer; `*_heads` map attention
    module names to their number of heads (`attention_heads`)."""
    out = {}
    for key, target in student.items():
        source_key = teacher_key(key, layers)
        if source_key not in teacher:
            raise InheritanceError(f"cannot inherit {key}: the teacher has no {source_key}")
        source = teacher[source_key]
        module, _, name = key.rpartition(".")
        if name in ("in_proj_weight", "in_proj_bias"):
            attention, teacher_attention = module, source_key.rpartition(".")[0]
        elif key.endswith(".out_proj.weight"):  # its input dimension is the heads' outputs side by side
            attention, teacher_attention = module[:-len(".out_proj")], source_key[:-len(".out_proj.weight")]
        else:
            attention = teacher_attention = None
        if attention in student_heads and teacher_attention in teacher_heads:
            value = _per_head(key, source, target.shape, student_heads[attention], teacher_heads[teacher_attention])
        else:
            exact, why = next(((dims, reason) for pattern, dims, reason in _EXACT_DIMS if pattern.search(key)),
                              ((), ""))
            value = _leading(key, source, target.shape, exact, why)
        out[key] = value.to(target.dtype).clone()
    return out


# ---- modules ----------------------------------------------------------------------------------------------------

def inherit_weights(student: nn.Module, teacher: nn.Module, image_layers: str | None = None,
                    text_layers: str | None = None) -> dict[str, list[int]]:
    """Copy the teacher's weights into `student` in place (layer specs per tower); return the layer mapping."""
    student, teacher = unwrap(student), unwrap(teacher)
    check_family(teacher, "teacher")
    check_family(student, "student")
    depth_t, depth_s = depths(teacher), depths(student)
    specs = {"image": image_layers, "text": text_layers}
    layers = {tower: choose_layers(specs[tower], depth_t[tower], depth_s[tower], tower) for tower in TOWERS}
    target = student.state_dict()
    values = inherit_state_dict(teacher.state_dict(), target, layers, attention_heads(teacher),
                                attention_heads(student))
    with torch.no_grad():
        for key, value in values.items():
            target[key].copy_(value)  # state_dict tensors share storage with the parameters and buffers
    return layers


def init_student_from_teacher(student: nn.Module, teacher: nn.Module | None, model: ModelConfig,
                              teacher_config: TeacherConfig) -> None:
    """--init-from-teacher: the student starts from the first teacher's weights.

    With --teacher-cache no teacher is built for training; the first --teacher is then built on the CPU from its
    --teacher-pretrained weights (which the cache has checked are the cached teacher's) just for this copy."""
    from .teacher import Teacher

    if isinstance(teacher, Teacher):
        source = teacher.members[0]
    else:
        if not teacher_config.teacher_pretrained:
            raise InheritanceError("with --teacher-cache, give --teacher and --teacher-pretrained (the cached "
                                   "teacher's weights) to inherit from")
        from . import create_clip

        source = create_clip(teacher_config.models[0], teacher_config.weights[0], torch.device("cpu"))
    if len(teacher_config.models) > 1:
        log.info("--init-from-teacher: inheriting from the first ensemble member, %s", teacher_config.models[0])
    image_spec = model.inherit_image_layers or model.inherit_layers
    text_spec = model.inherit_text_layers or model.inherit_layers
    layers = inherit_weights(student, source, image_spec, text_spec)
    depth = depths(source)
    log.info("student initialised from teacher %s: image layers %s of %d, text layers %s of %d",
             teacher_config.models[0], layers["image"], depth["image"], layers["text"], depth["text"])

"""Image views shared by teacher and student.

KD needs the teacher and the student to see the *same* augmented view, even when the two models want another
size, mean/std or interpolation. So a training view is drawn once (crop box, flip) as `ViewParams`, and each
model renders it in its own `ImageFormat`. The parameters are plain numbers, which is what lets the teacher
cache store them and replay the exact view later.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

_INTERP = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
           "nearest": InterpolationMode.NEAREST}


@dataclass(frozen=True)
class ImageFormat:
    """What one model expects: square size, normalisation and resize interpolation."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"

    @classmethod
    def from_model(cls, model) -> ImageFormat:
        visual = model.visual
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size", getattr(visual, "image_size", 224))
        if isinstance(size, (tuple, list)):
            if size[0] != size[1]:
                raise ValueError(f"non-square image size {size} is not supported")
            size = size[0]
        return cls(size=int(size), mean=tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
                   std=tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
                   interpolation=cfg.get("interpolation", "bicubic"))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ViewParams:
    """A crop box (top, left, height, width) in source pixels plus a horizontal flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool = False

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        return (self.top, self.left, self.height, self.width, int(self.flip))

    @classmethod
    def from_tuple(cls, values) -> ViewParams:
        top, left, height, width, flip = (int(v) for v in values)
        return cls(top, left, height, width, bool(flip))


def centre_view(width: int, height: int) -> ViewParams:
    """The eval view: the largest centred square (resize-shorter-side + centre-crop, as open_clip evaluates)."""
    side = min(width, height)
    return ViewParams(top=(height - side) // 2, left=(width - side) // 2, height=side, width=side)


def sample_view(width: int, height: int, rng: random.Random, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3),
                flip_prob: float = 0.0) -> ViewParams:
    """RandomResizedCrop's box sampling (same algorithm as torchvision), with an explicit RNG."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box = None
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            box = (rng.randint(0, height - h), rng.randint(0, width - w), h, w)
            break
    if box is None:  # fallback: centre crop at the clamped ratio, as torchvision does
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            h, w = height, int(round(height * ratio[1]))
        else:
            w, h = width, height
        box = ((height - h) // 2, (width - w) // 2, h, w)
    flip = flip_prob > 0 and rng.random() < flip_prob
    return ViewParams(*box, flip=flip)


def render_view(image, view: ViewParams, fmt: ImageFormat) -> torch.Tensor:
    """Crop, resize, flip and normalise a PIL image into one model's input tensor."""
    image = image.convert("RGB")
    out = TF.resized_crop(image, view.top, view.left, view.height, view.width, [fmt.size, fmt.size],
                          interpolation=_INTERP.get(fmt.interpolation, InterpolationMode.BICUBIC), antialias=True)
    if view.flip:
        out = TF.hflip(out)
    return TF.normalize(TF.to_tensor(out), fmt.mean, fmt.std)


class PairedViews:
    """Draw one view per sample and render it for the student and, when its format differs, the teacher.

    Returns {"image": student tensor, "teacher_image": teacher tensor (only if formats differ), "view": params}.
    """

    def __init__(self, student: ImageFormat, teacher: ImageFormat | None, train: bool, scale=(0.9, 1.0),
                 flip_prob: float = 0.0, seed: int | None = None):
        self.student = student
        self.teacher = teacher if teacher is not None and teacher != student else None
        self.train = train
        self.scale = scale
        self.flip_prob = flip_prob
        self.rng = random.Random(seed)

    def reseed(self, seed: int) -> None:
        self.rng.seed(seed)

    def draw(self, image, rng: random.Random | None = None) -> ViewParams:
        w, h = image.size
        if not self.train:
            return centre_view(w, h)
        return sample_view(w, h, rng or self.rng, scale=self.scale, flip_prob=self.flip_prob)

    def __call__(self, image, view: ViewParams | None = None, rng: random.Random | None = None) -> dict:
        """`rng` makes the view a function of the sample (e.g. seeded by (seed, epoch, key)) for exact resume."""
        view = view if view is not None else self.draw(image, rng)
        out = {"image": render_view(image, view, self.student), "view": torch.tensor(view.as_tuple())}
        if self.teacher is not None:
            out["teacher_image"] = render_view(image, view, self.teacher)
        return out


class EvalTransform:
    """PIL image -> tensor in one model's format, centre view (what evaluation feeds the model)."""

    def __init__(self, fmt: ImageFormat):
        self.fmt = fmt

    def __call__(self, image) -> torch.Tensor:
        return render_view(image, centre_view(*image.size), self.fmt)

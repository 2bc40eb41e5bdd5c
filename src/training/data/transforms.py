"""Image views shared by teacher and student.

KD needs the teacher and the student to see the *same* augmented view, even when the two models want another
size, mean/std or interpolation. So a training view is drawn once (crop box, flip) as `ViewParams`, and each
model renders it in its own `ImageFormat`. The parameters are plain numbers, which is what lets the teacher
cache store them and replay the exact view later.

Workers render uint8 pixels (`render_pixels`); the float cast and the normalisation with each model's mean/std happen
on the device (training.data.device). A JPEG much larger than the crop it becomes is decoded at a reduced DCT scale
(`SourceImage`, Pillow's `draft`): the crop box stays in source pixels and is mapped onto the reduced image, and the
scale is a function of (source size, view, output size) only, so the teacher cache's build and its replay render the
same pixels.

Under `--decode-device cpu|cuda` the workers ship the encoded bytes and the drawn view instead (`PairedViews(...,
encoded=True)`), and the trainer decodes the batch and renders each view with `render_tensor_pixels`
(training.data.device.BatchDecoder): the same crop box and flip, resampled by torchvision's tensor kernels rather than
PIL's, so the pixels agree to a few grey levels, not bit for bit.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

_INTERP = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
           "nearest": InterpolationMode.NEAREST}
_PIL_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                 "nearest": Image.Resampling.NEAREST}
DCT_SCALES = (8, 4, 2)  # the reductions libjpeg decodes at directly (Pillow's draft)


class ImageDecodeError(OSError):
    """A source whose header was readable but whose pixels are not: the sample is skipped and counted."""

    skip_reason = "corrupt_image"


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


def dct_scale(view: ViewParams, size: int) -> int:
    """The JPEG DCT reduction for rendering `view` at `size` px: the largest of 8, 4, 2 that keeps the crop at least
    `size` px on its shorter side, else 1 (full decode)."""
    shorter = min(view.height, view.width)
    return next((s for s in DCT_SCALES if shorter >= s * size), 1)


class SourceImage:
    """An encoded image opened for its size only; `at_scale(s)` decodes it (JPEG: at 1/s, by DCT scaling) as RGB.

    Decodes are kept per scale, so one sample's views of the same scale decode once."""

    def __init__(self, data: bytes):
        self.data = data
        with Image.open(io.BytesIO(data)) as probe:  # header only: raises for data that is no image
            self.size = probe.size
            self.format = probe.format
        self._decoded: dict[int, tuple[Image.Image, float]] = {}

    def at_scale(self, scale: int) -> tuple[Image.Image, float]:
        """(RGB image, the factor source px / decoded px); formats without DCT scaling decode at full size."""
        if scale not in self._decoded:
            try:
                with Image.open(io.BytesIO(self.data)) as im:
                    factor = 1.0
                    if scale > 1 and im.format == "JPEG":
                        # asks for exactly 1/scale; libjpeg maps source x to x / scale (the last pixel partial)
                        drafted = im.draft("RGB", (max(1, im.size[0] // scale), max(1, im.size[1] // scale)))
                        if drafted is not None:
                            factor = self.size[0] / drafted[1][2]
                    self._decoded[scale] = im.convert("RGB"), factor
            except (OSError, ValueError, SyntaxError) as exc:
                raise ImageDecodeError(f"cannot decode image: {exc}") from exc
        return self._decoded[scale]

    def full(self) -> Image.Image:
        return self.at_scale(1)[0]


def render_pixels(image, view: ViewParams, fmt: ImageFormat) -> torch.Tensor:
    """Crop, resize and flip an image into one model's uint8 input [3, size, size] (not normalised).

    `image` is a PIL image (decoded) or a SourceImage (decoded here, at the DCT scale `dct_scale` picks: the box is
    mapped onto the reduced image in fractional pixels, so the geometry stays that of the source box)."""
    size = [fmt.size, fmt.size]
    scale = dct_scale(view, fmt.size) if isinstance(image, SourceImage) else 1
    if isinstance(image, SourceImage):
        image, factor = image.at_scale(scale)
    else:
        image, factor = image.convert("RGB"), 1.0
    if factor == 1.0:  # as torchvision's RandomResizedCrop renders it
        out = TF.resized_crop(image, view.top, view.left, view.height, view.width, size,
                              interpolation=_INTERP.get(fmt.interpolation, InterpolationMode.BICUBIC), antialias=True)
    else:
        box = (view.left / factor, view.top / factor, (view.left + view.width) / factor,
               (view.top + view.height) / factor)
        out = image.resize((fmt.size, fmt.size), _PIL_RESAMPLE.get(fmt.interpolation, Image.Resampling.BICUBIC),
                           box=box)
    if view.flip:
        out = TF.hflip(out)
    return torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def render_tensor_pixels(image: torch.Tensor, view: ViewParams, fmt: ImageFormat) -> torch.Tensor:
    """`render_pixels` for a decoded uint8 tensor [3, H, W] (on any device): the same box in source pixels and the
    same flip, resized with torchvision's antialiased tensor kernels. Those are not PIL's (nor is a full decode the
    reduced DCT decode), so the result matches `render_pixels` within a few grey levels, not exactly."""
    out = TF.resized_crop(image, view.top, view.left, view.height, view.width, [fmt.size, fmt.size],
                          interpolation=_INTERP.get(fmt.interpolation, InterpolationMode.BICUBIC), antialias=True)
    return TF.hflip(out) if view.flip else out


def render_view(image, view: ViewParams, fmt: ImageFormat) -> torch.Tensor:
    """One model's normalised float input (CPU): `render_pixels`, then the normalisation the trainer does on the
    device (evaluation and the teacher-cache build use this)."""
    from .device import normalize_pixels

    return normalize_pixels(render_pixels(image, view, fmt), fmt)


def same_pixels(a: ImageFormat, b: ImageFormat) -> bool:
    """Whether two formats render the same uint8 pixels (they may still normalise differently)."""
    return a.size == b.size and a.interpolation == b.interpolation


class PairedViews:
    """Draw one view per sample and render it (uint8) for the student and, when it needs other pixels (size or
    interpolation), the teacher; each model's mean/std is applied on the device.

    Returns {"image": student uint8 [3, S, S], "teacher_image": teacher uint8 (only if its pixels differ),
    "view": params}. With `encoded` (--decode-device cpu|cuda) nothing is decoded: the view is drawn from the header's
    size exactly as above and the sample is {"encoded": the file's bytes as uint8 [N], "view": params}; the trainer
    renders both models' pixels from them (training.data.device.BatchDecoder).
    """

    def __init__(self, student: ImageFormat, teacher: ImageFormat | None, train: bool, scale=(0.9, 1.0),
                 flip_prob: float = 0.0, seed: int | None = None, encoded: bool = False):
        self.student = student
        self.encoded = encoded
        self.teacher = teacher if teacher is not None and not same_pixels(teacher, student) else None
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
        if self.encoded:
            if not isinstance(image, SourceImage):
                raise TypeError("encoded views need the undecoded source (a SourceImage), not decoded pixels")
            return {"encoded": torch.frombuffer(bytearray(image.data), dtype=torch.uint8),
                    "view": torch.tensor(view.as_tuple())}
        out = {"image": render_pixels(image, view, self.student), "view": torch.tensor(view.as_tuple())}
        if self.teacher is not None:
            out["teacher_image"] = render_pixels(image, view, self.teacher)
        return out


class EvalTransform:
    """PIL image -> normalised float tensor in one model's format, centre view (what evaluation feeds the model)."""

    def __init__(self, fmt: ImageFormat):
        self.fmt = fmt

    def __call__(self, image) -> torch.Tensor:
        return render_view(image, centre_view(*image.size), self.fmt)

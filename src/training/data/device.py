"""The device half of the data path: uint8 pixel batches become each model's normalised float input.

Workers ship uint8 crops (a quarter of the bytes of fp32, and no per-pixel float work on the CPU); the trainer copies
them to the device (`non_blocking`, from pinned memory) and casts + normalises there, once per model format, as timm's
PrefetchLoader does. The arithmetic is torchvision's `to_tensor` + `normalize` (x / 255, - mean, / std, in fp32), so the
result equals the float the workers used to ship.

`--decode-device cpu|cuda` moves the decode too (`BatchDecoder`): the workers ship each file's bytes and the view
they drew, and the trainer decodes the batch with torchvision.io.decode_jpeg (one batched nvjpeg call on CUDA) and
crops, resizes and flips there, into the same uint8 `image` / `teacher_image` the workers would have shipped (within
a few grey levels: torchvision's resampling kernels, not PIL's).
"""

from __future__ import annotations

import functools
import logging
from collections import Counter

import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from .transforms import ImageFormat, ViewParams, render_tensor_pixels, same_pixels

log = logging.getLogger(__name__)
BLANKED = "corrupt_image_blanked"  # the `skipped` reason of a source the trainer could not decode


@functools.lru_cache(maxsize=32)
def _mean_std(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    as_column = lambda v: torch.tensor(v, dtype=torch.float32, device=device).view(-1, 1, 1)  # noqa: E731
    return as_column(mean), as_column(std)


def normalize_pixels(pixels: torch.Tensor, fmt: ImageFormat, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> (x / 255 - mean) / std in `dtype`, on the pixels' device."""
    mean, std = _mean_std(tuple(fmt.mean), tuple(fmt.std), pixels.device)
    return pixels.to(torch.float32).div_(255).sub_(mean).div_(std).to(dtype)


def model_image(pixels: torch.Tensor, fmt: ImageFormat | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One model's input from a batch's image tensor: uint8 pixels are copied, cast and normalised on `device`; a float
    tensor was normalised by a custom transform already (DataTransforms.student_train and the like) and is only moved."""
    moved = pixels.to(device, non_blocking=True)
    if moved.dtype != torch.uint8:
        return moved.to(dtype)
    if fmt is None:
        raise ValueError("uint8 images need the model's ImageFormat to be normalised")
    return normalize_pixels(moved, fmt, dtype)


def teacher_image(batch: dict, student_input: torch.Tensor, student: ImageFormat | None,
                  teacher: ImageFormat | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The teacher's input: its own rendering (`teacher_image`, another size or interpolation) or the student's uint8
    crop, normalised with the teacher's mean/std; the student's input itself when the formats agree."""
    if "teacher_image" in batch:
        return model_image(batch["teacher_image"], teacher, device, dtype)
    if teacher is None or student is None or (tuple(teacher.mean), tuple(teacher.std)) == \
            (tuple(student.mean), tuple(student.std)) or batch["image"].dtype != torch.uint8:
        return student_input
    return model_image(batch["image"], teacher, device, dtype)


def _is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() >= 3 and bool((data[:3] == torch.tensor([0xFF, 0xD8, 0xFF], dtype=torch.uint8)).all())


class BatchDecoder:
    """--decode-device cpu|cuda: a batch of encoded sources (`encoded`, `view`: PairedViews(..., encoded=True)) ->
    the uint8 `image` (and `teacher_image` when the teacher wants other pixels) on `device`, as the workers render them.

    JPEGs are decoded together (decode_jpeg on a list: batched by nvjpeg on CUDA); other formats (PNG, WebP, ...) and
    JPEGs the device decoder refuses (e.g. CMYK under nvjpeg) are decoded one by one on the CPU and moved, said once in
    the log. A source nothing decodes can no longer be replaced by the next row as the workers do (the batch is
    formed): it becomes a black image, counted as skipped/corrupt_image_blanked."""

    def __init__(self, student: ImageFormat, teacher: ImageFormat | None, device: torch.device):
        self.student = student
        self.teacher = teacher if teacher is not None and not same_pixels(teacher, student) else None
        self.device = torch.device(device)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._said: set[str] = set()

    def _once(self, what: str, message: str, *args) -> None:
        if what not in self._said:
            self._said.add(what)
            log.warning(message, *args)

    def _decode_jpeg(self, data):
        """decode_jpeg on the device (a tensor or a list). On CUDA with a stream of its own current: torchvision's
        nvjpeg path allocates its outputs on the current stream and writes them from another without waiting for it
        (pytorch/vision#9606), so on the training stream it could be handed, and overwrite, a block that kernels
        queued there still read. A decode-only stream's blocks have no queued readers; `record_stream` keeps the
        training stream's later reads of the outputs safe when they are freed."""
        if self._stream is None:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            out = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        main.wait_stream(self._stream)
        for image in out if isinstance(out, list) else [out]:
            image.record_stream(main)
        return out

    def decode(self, encoded: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Each source as uint8 RGB [3, H, W] on the device (None: undecodable)."""
        out: list[torch.Tensor | None] = [None] * len(encoded)
        jpegs = [i for i, data in enumerate(encoded) if _is_jpeg(data)]
        try:
            decoded = self._decode_jpeg([encoded[i] for i in jpegs]) if jpegs else []
            for i, image in zip(jpegs, decoded):
                out[i] = image
        except RuntimeError:  # one source spoils the batched call: find it by decoding one at a time
            for i in jpegs:
                out[i] = self._decode_one(encoded[i], jpeg=True)
        for i in sorted(set(range(len(encoded))) - set(jpegs)):
            self._once("other", "--decode-device: sources that are not JPEG are decoded on the CPU, one by one")
            out[i] = self._decode_one(encoded[i], jpeg=False)
        return out

    def _decode_one(self, data: torch.Tensor, jpeg: bool) -> torch.Tensor | None:
        if jpeg and self.device.type != "cpu":
            try:
                return self._decode_jpeg(data)
            except RuntimeError:
                self._once("refused", "--decode-device %s: a JPEG the device decoder refuses is decoded on the "
                           "CPU", self.device.type)
        try:
            return decode_image(data, mode=ImageReadMode.RGB).to(self.device)
        except RuntimeError as exc:
            self._once("corrupt", "--decode-device: a source that does not decode (%s) is trained as a black image "
                       "and counted as skipped/%s", str(exc).splitlines()[-1][:120], BLANKED)
            return None

    def _render(self, images: list[torch.Tensor | None], views: list[ViewParams], fmt: ImageFormat) -> torch.Tensor:
        blank = torch.zeros(3, fmt.size, fmt.size, dtype=torch.uint8, device=self.device)
        return torch.stack([render_tensor_pixels(image, view, fmt) if image is not None else blank
                            for image, view in zip(images, views)])

    def __call__(self, batch: dict) -> dict:
        """The batch with `encoded` replaced by the rendered pixels (a batch without `encoded` is returned as is)."""
        if "encoded" not in batch:
            return batch
        out = {k: v for k, v in batch.items() if k != "encoded"}
        images = self.decode(batch["encoded"])
        views = [ViewParams.from_tuple(v) for v in batch["view"].tolist()]
        out["image"] = self._render(images, views, self.student)
        if self.teacher is not None:
            out["teacher_image"] = self._render(images, views, self.teacher)
        failed = sum(image is None for image in images)
        if failed:
            out["skipped"] = dict(Counter(batch.get("skipped", {})) + Counter({BLANKED: failed}))
        return out

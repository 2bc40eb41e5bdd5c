"""The device half of the data path: uint8 pixel batches become each model's normalised float input.

Workers ship uint8 crops (a quarter of the bytes of fp32, and no per-pixel float work on the CPU); the trainer copies
them to the device (`non_blocking`, from pinned memory) and casts + normalises there, once per model format, as timm's
PrefetchLoader does. The arithmetic is torchvision's `to_tensor` + `normalize` (x / 255, - mean, / std, in fp32), so the
result equals the float the workers used to ship.
"""

from __future__ import annotations

import functools

import torch

from .transforms import ImageFormat


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

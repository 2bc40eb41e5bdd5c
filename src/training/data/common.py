"""Pieces shared by every data source: the transforms bundle, DataInfo, and the batch collate."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class DataTransforms:
    """What each model needs from one decoded sample. Teacher entries are None when they equal the student's."""

    student_train: Callable
    student_val: Callable
    tokenizer: Callable
    teacher_train: Callable | None = None
    teacher_val: Callable | None = None
    teacher_tokenizer: Callable | None = None

    def for_split(self, is_train: bool) -> tuple[Callable, Callable | None]:
        if is_train:
            return self.student_train, self.teacher_train
        return self.student_val, self.teacher_val


def make_sample(image, caption: str, key: str, transforms: DataTransforms, is_train: bool) -> dict[str, Any]:
    """Turn one decoded PIL image + caption into the model inputs (teacher tensors only when they differ)."""
    student_tf, teacher_tf = transforms.for_split(is_train)
    sample = {"image": student_tf(image), "text": transforms.tokenizer([caption])[0], "key": key}
    if teacher_tf is not None:
        sample["teacher_image"] = teacher_tf(image)
    if transforms.teacher_tokenizer is not None:
        sample["teacher_text"] = transforms.teacher_tokenizer([caption])[0]
    return sample


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep keys as a list, and sum the per-sample `skipped` counters into one dict."""
    batch: dict[str, Any] = {}
    skipped: Counter = Counter()
    for s in samples:
        skipped.update(s.get("skipped", {}))
    for name in samples[0]:
        if name == "skipped":
            continue
        values = [s[name] for s in samples]
        batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    batch["skipped"] = dict(skipped)
    return batch


@dataclass
class DataInfo:
    """A loader plus what the trainer needs to drive it: sizes, epoch setting and mid-epoch resume."""

    dataloader: Any
    num_batches: int
    num_samples: int
    set_epoch_fn: Callable[[int, int], None] | None = None
    extra: dict = field(default_factory=dict)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Deterministic order for (seed, epoch); skip the first `start_batch` batches (mid-epoch resume)."""
        if self.set_epoch_fn is not None:
            self.set_epoch_fn(epoch, start_batch)

"""Pieces shared by every data source: the transforms bundle, DataInfo, and the batch collate."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class DataTransforms:
    """What each model needs from one decoded sample.

    `train_views`/`val_views` (training.data.transforms.PairedViews) render ONE random view for both models, so the
    teacher and the student see the same crop; the trainer always builds these. Plain per-model callables
    (`student_train`, ...) are a fallback for simple uses; teacher entries are None when they equal the student's.
    """

    student_train: Callable | None = None
    student_val: Callable | None = None
    tokenizer: Callable | None = None
    teacher_train: Callable | None = None
    teacher_val: Callable | None = None
    teacher_tokenizer: Callable | None = None
    train_views: Callable | None = None
    val_views: Callable | None = None
    teacher_cache: Any = None  # training.teacher_cache.TeacherCache under --teacher-cache (train split only)

    def for_split(self, is_train: bool) -> tuple[Callable, Callable | None]:
        if is_train:
            return self.student_train, self.teacher_train
        return self.student_val, self.teacher_val


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """Augmentation RNG that depends only on (seed, epoch, sample key): resume and worker count don't change views."""
    return random.Random(f"{seed}/{epoch}/{key}")


def make_sample(image, caption: str, key: str, transforms: DataTransforms, is_train: bool,
                rng: random.Random | None = None) -> dict[str, Any]:
    """Turn one decoded PIL image + caption into the model inputs (teacher tensors only when they differ)."""
    views = transforms.train_views if is_train else transforms.val_views
    cached = None
    if is_train and transforms.teacher_cache is not None:  # replay the view the teacher embedded, join its targets
        if views is None:
            raise ValueError("a teacher cache needs DataTransforms.train_views (PairedViews) to replay its views")
        cached = transforms.teacher_cache.sample_entry(key, caption, image.size, rng if rng is not None else views.rng)
    if views is not None:
        sample = views(image, view=cached.pop("view") if cached else None, rng=rng)
    else:
        student_tf, teacher_tf = transforms.for_split(is_train)
        sample = {"image": student_tf(image)}
        if teacher_tf is not None:
            sample["teacher_image"] = teacher_tf(image)
    sample["text"] = transforms.tokenizer([caption])[0]
    sample["key"] = key
    if transforms.teacher_tokenizer is not None:
        sample["teacher_text"] = transforms.teacher_tokenizer([caption])[0]
    if cached:
        sample.update(cached)  # teacher_image_emb, teacher_text_emb, teacher_view_index
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

    def state_dict(self):  # TEMPORARY (the data package split brings the real one)
        return self.extra["state_fn"]() if "state_fn" in self.extra else None

    def load_state_dict(self, states: list) -> None:
        if "load_state_fn" in self.extra:
            self.extra["load_state_fn"](states)

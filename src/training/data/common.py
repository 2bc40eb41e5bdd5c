"""Pieces shared by every data source: the transforms bundle, the teacher-cache join interface, DataInfo, and the
batch collate."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

MISSING_REASON = "not_in_teacher_cache"  # the `skipped` reason of a sample the teacher cache lacks


class SampleNotCached(LookupError):
    """A training sample whose key is not in the cache, under --cache-missing skip.

    The CSV loader leaves uncached rows out of each epoch's order up front (`TeacherJoin.contains_keys`) and counts
    them; the WebDataset loader treats an exception from `make_sample` carrying `skip_reason` like a bad image: the
    sample is replaced by the next one of the stream and counted in the batch's `skipped` dict.
    """

    skip_reason = MISSING_REASON


class TeacherJoin(Protocol):
    """What the data layer asks of `DataTransforms.teacher_cache` (training.teacher_cache.TeacherCache implements
    it): the loaders call only these, and never import the cache."""

    dir: str  # shown in errors
    missing: str  # "error" or "skip" (--cache-missing)
    manifest: dict  # manifest["data"]["shards"]: the shard stems it was built from (WebDataset), if listed

    def __contains__(self, key: str) -> bool: ...

    def contains_keys(self, keys: Sequence[str]) -> np.ndarray:
        """Boolean mask of the keys it holds."""

    def sample_entry(self, key: str, caption: str, image_size: tuple[int, int], rng: random.Random | None) -> dict:
        """{"view": ViewParams to replay, teacher_* tensors}; raises SampleNotCached (skip) or TeacherCacheError."""


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
    teacher_cache: TeacherJoin | None = None  # under --teacher-cache (train split only)

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
    if transforms.tokenizer is not None:  # None: the student has no text tower (image-only students)
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
    """A loader plus what the trainer needs to drive it: sizes, epoch setting and mid-epoch resume.

    `stateful` (WebDataset) has `state_dict()`/`load_state_dict(states)` for a loader whose position is more than
    (epoch, batch); the map-style loaders resume from (epoch, batch) alone and have none."""

    dataloader: Any
    num_batches: int
    num_samples: int
    set_epoch_fn: Callable[[int, int], None] | None = None
    extra: dict = field(default_factory=dict)
    stateful: Any = None

    def state_dict(self) -> dict | None:
        """This rank's loader state (None when there is none); it differs between ranks: keep one per rank."""
        return self.stateful.state_dict() if self.stateful is not None else None

    def load_state_dict(self, states: list) -> None:
        """The states gathered over ranks (indexed by rank); used by the next `set_epoch` when they match."""
        if self.stateful is not None:
            self.stateful.load_state_dict(states)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Deterministic order for (seed, epoch); skip the first `start_batch` batches (mid-epoch resume)."""
        if self.set_epoch_fn is not None:
            self.set_epoch_fn(epoch, start_batch)

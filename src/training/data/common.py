"""Pieces shared by every data source: the transforms bundle, the teacher-cache join interface, DataInfo, and the
batch collate."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from .transforms import SourceImage

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

    def sample_entry(self, key: str, caption, image_size: tuple[int, int], rng: random.Random | None,
                     caption_indices: Sequence[int] = (0,)) -> dict:
        """{"view": ViewParams to replay, teacher_* tensors (the text embeddings of the drawn captions: `_2` for the
        second)}; raises SampleNotCached (skip) or TeacherCacheError."""


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
    captions_per_step: int = 1  # --captions-per-step: 2 adds a second caption per image (MobileCLIP's two-caption loss)

    def for_split(self, is_train: bool) -> tuple[Callable, Callable | None]:
        if is_train:
            return self.student_train, self.teacher_train
        return self.student_val, self.teacher_val


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """Augmentation RNG that depends only on (seed, epoch, sample key): resume and worker count don't change views."""
    return random.Random(f"{seed}/{epoch}/{key}")


Captions = str | Sequence[str]  # one caption, or a sample's K captions (a JSON list cell, several WebDataset keys)


def as_captions(caption: Captions) -> list[str]:
    """A sample's captions as a list (one caption -> a list of one)."""
    return [caption] if isinstance(caption, str) else list(caption)


def parse_caption_list(text: str) -> str | list[str]:
    """A caption cell: a JSON list of strings (`["a cat", "a small cat"]`) is several captions, blank ones dropped;
    any other text (also text that merely starts with '[') is one caption."""
    stripped = text.strip()
    if not (stripped.startswith("[") and stripped.endswith("]")):
        return text
    try:
        value = json.loads(stripped)
    except ValueError:
        return text
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return text
    captions = [v.strip() for v in value if v.strip()]
    return captions[0] if len(captions) == 1 else captions


def caption_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The caption draw's RNG: a function of (seed, epoch, sample key) only, like `sample_rng`, but its own stream,
    so drawing captions leaves the augmentation draws of single-caption data unchanged."""
    return random.Random(f"{seed}/{epoch}/{key}/caption")


def draw_captions(count: int, per_step: int, rng: random.Random | None) -> list[int]:
    """Indices of the captions a step uses: one drawn uniformly (`per_step` 1), or two distinct ones (2; a sample
    with a single caption uses it twice). Without an RNG (evaluation) the first ones."""
    if count < 1:
        raise ValueError("a sample needs at least one caption")
    if rng is None or count == 1:
        return [min(i, count - 1) for i in range(per_step)]
    first = rng.randrange(count)
    if per_step == 1:
        return [first]
    second = rng.randrange(count - 1)
    return [first, second + (second >= first)]


def make_sample(image, caption: Captions, key: str, transforms: DataTransforms, is_train: bool,
                rng: random.Random | None = None, captions_rng: random.Random | None = None,
                teacher_entry: dict | None = None, caption_indices: Sequence[int] | None = None,
                caption_tokens: torch.Tensor | None = None) -> dict[str, Any]:
    """Turn one image (a PIL image, or a SourceImage decoded here as the views need) + its caption(s) into the model
    inputs: uint8 pixels (normalised on the device, training.data.device), teacher pixels only when they differ.

    Several captions: `draw_captions` picks `transforms.captions_per_step` of them with `captions_rng`; the first goes
    to `text`, the second (if any) to `text_2`, and `caption_index` records which were drawn. A source that carries
    its own teacher embeddings (DataCompDR shards) passes the drawn `teacher_entry` (as a cache's `sample_entry`
    returns it) and its `caption_indices`. `caption_tokens` [captions, context]: the student's ids of every caption,
    stored at conversion (training.data.tokens); used instead of the tokenizer when they number the captions."""
    views = transforms.train_views if is_train else transforms.val_views
    captions = as_captions(caption)
    chosen = list(caption_indices) if caption_indices is not None else \
        draw_captions(len(captions), transforms.captions_per_step, captions_rng if is_train else None)
    cached = dict(teacher_entry) if is_train and teacher_entry is not None else None
    if cached is None and is_train and transforms.teacher_cache is not None:  # replay the view the teacher embedded, join its targets
        if views is None:
            raise ValueError("a teacher cache needs DataTransforms.train_views (PairedViews) to replay its views")
        cached = transforms.teacher_cache.sample_entry(key, caption, image.size, rng if rng is not None else views.rng,
                                                       caption_indices=chosen)
    if views is not None:
        sample = views(image, view=cached.pop("view") if cached else None, rng=rng)
    else:
        student_tf, teacher_tf = transforms.for_split(is_train)
        decoded = image.full() if isinstance(image, SourceImage) else image  # plain callables take a PIL image
        sample = {"image": student_tf(decoded)}
        if teacher_tf is not None:
            sample["teacher_image"] = teacher_tf(decoded)
    stored = caption_tokens is not None and caption_tokens.shape[0] == len(captions)
    for i, c in enumerate(chosen):
        suffix = "" if i == 0 else f"_{i + 1}"  # text, text_2
        if transforms.tokenizer is not None:  # None: the student has no text tower (image-only students)
            sample["text" + suffix] = caption_tokens[c] if stored else transforms.tokenizer([captions[c]])[0]
        if transforms.teacher_tokenizer is not None:
            sample["teacher_text" + suffix] = transforms.teacher_tokenizer([captions[c]])[0]
    sample["caption_index"] = torch.tensor(chosen, dtype=torch.long)  # [captions_per_step]
    sample["key"] = key
    if cached:
        sample.update(cached)  # teacher_image_emb, teacher_text_emb, teacher_view_index
    return sample


LISTED = ("encoded",)  # per-sample tensors of their own length (a file's bytes): a list, never stacked


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep keys (and the `LISTED` fields) as lists, and sum the per-sample `skipped` counters into
    one dict."""
    batch: dict[str, Any] = {}
    skipped: Counter = Counter()
    for s in samples:
        skipped.update(s.get("skipped", {}))
    for name in samples[0]:
        if name == "skipped":
            continue
        values = [s[name] for s in samples]
        batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) and name not in LISTED else values
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

"""CSV image–caption data (open_clip / CLIP-KD format: `filepath<TAB>title`, paths relative to --data-root).

A caption cell holding a JSON list of strings (`["a cat", "a small cat"]`) gives the row several captions; each
epoch draws one (two with --captions-per-step 2) from (seed, epoch, key), so a resume draws the same.

Bad rows never crash training and never shrink a batch: an empty caption is dropped at load time, and a missing or
corrupt image is replaced by the next good row of the same file; both are counted and reach the logs through the
batch's `skipped` field.

Under `--teacher-cache DIR --cache-missing skip`, rows whose key the cache lacks are known before training (one
vectorised lookup): every epoch's order is the usual (seed, epoch) permutation with those rows taken out, so an
epoch is the trainable rows, batches stay full, no row repeats, and resume stays exact. Each epoch counts them once
as `not_in_teacher_cache` (on its first sample).
"""

from __future__ import annotations

import logging
import os
from collections import Counter

import numpy as np
import pandas as pd
import torch
from PIL import UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import DataConfig
from ..errors import TeacherCacheError, UnusableRowsError, UsageError, usage_error
from .common import (
    MISSING_REASON,
    DataInfo,
    DataTransforms,
    TeacherJoin,
    caption_rng,
    collate,
    make_sample,
    parse_caption_list,
    sample_rng,
)
from .transforms import SourceImage

_MAX_SUBSTITUTES = 64


def read_csv_table(paths: list[str], roots: list[str | None], img_key: str, caption_key: str,
                   sep: str) -> tuple[list[str], list, list[str], Counter]:
    """Load and concatenate CSVs; returns (image paths, captions, keys, counts of dropped rows). A caption is a
    string, or a list of strings for a cell holding a JSON list (`["a cat", "a small cat"]`)."""
    if roots and len(roots) not in (1, len(paths)):
        raise UsageError(f"--data-root lists {len(roots)} roots for {len(paths)} CSV files; give one, or one per CSV")
    images, captions, keys = [], [], []
    dropped: Counter = Counter()
    for i, path in enumerate(paths):
        if not os.path.isfile(path):
            raise UsageError(f"data file not found: {path}")
        root = roots[i] if len(roots) == len(paths) else (roots[0] if roots else None)
        try:
            df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, quoting=3, engine="python"
                             if len(sep) > 1 else "c")
        except Exception as exc:  # pandas raises many types for malformed files
            raise usage_error(f"cannot parse CSV {path}", exc) from exc
        for key in (img_key, caption_key) if caption_key else (img_key,):  # caption_key '': no caption column
            if key not in df.columns:
                raise UsageError(f"{path} has no column '{key}' (columns: {', '.join(map(str, df.columns))}); "
                                 f"set --csv-img-key/--csv-caption-key/--csv-separator")
        stem = os.path.splitext(os.path.basename(path))[0]
        caps = df[caption_key].tolist() if caption_key else [""] * len(df)
        for row, (img, cap) in enumerate(zip(df[img_key].tolist(), caps)):
            cap = parse_caption_list(str(cap))  # a JSON list cell holds several captions
            if caption_key and not (cap.strip() if isinstance(cap, str) else cap):
                dropped["empty_caption"] += 1
                continue
            images.append(os.path.join(root, img) if root and not os.path.isabs(img) else img)
            captions.append(cap)
            keys.append(f"{stem}/{row}")
    if not images:
        raise UsageError(f"no usable rows in {', '.join(paths)}")
    return images, captions, keys, dropped


def open_image(path: str):
    """(SourceImage, None), or (None, skip reason) when the file is missing or is no image. The pixels are decoded
    when a view is rendered (at a reduced JPEG scale when the crop allows it); a failure there raises ImageDecodeError,
    counted as `corrupt_image` too."""
    try:
        with open(path, "rb") as f:
            return SourceImage(f.read()), None
    except FileNotFoundError:
        return None, "missing_image"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None, "corrupt_image"


class CsvDataset(Dataset):
    """Map-style dataset; indexed by (row, epoch) so the augmentation depends only on (seed, epoch, key)."""

    def __init__(self, paths: list[str], roots: list[str | None], transforms: DataTransforms, is_train: bool,
                 img_key: str = "filepath", caption_key: str = "title", sep: str = "\t", seed: int = 0):
        self.images, self.captions, self.keys, self.dropped = read_csv_table(paths, roots, img_key, caption_key, sep)
        self.transforms = transforms
        self.is_train = is_train
        self.seed = seed
        if self.dropped:
            logging.warning("CSV: dropped rows at load time: %s", dict(self.dropped))
        self.usable: np.ndarray | None = None  # rows the teacher cache holds, when it lacks some (skip mode)
        self._usable_rows: np.ndarray | None = None
        cache = transforms.teacher_cache if is_train else None
        if cache is not None and cache.missing == "skip":
            self._mask_uncached(cache, paths)

    def _mask_uncached(self, cache: TeacherJoin, paths: list[str]) -> None:
        usable = cache.contains_keys(self.keys)
        if not usable.any():
            raise TeacherCacheError(f"none of the {len(self)} training rows is in the teacher cache {cache.dir} "
                                    f"(--cache-missing skip leaves nothing to train on): rebuild it for "
                                    f"{', '.join(paths)} with python -m training.cache_teacher")
        if usable.all():
            return
        self.usable, self._usable_rows = usable, np.flatnonzero(usable)
        self.missing_reason = MISSING_REASON
        logging.warning("teacher cache: %d of %d rows are not cached (--cache-missing skip): every epoch leaves them "
                        "out and counts them as skipped/%s", len(self) - len(self._usable_rows), len(self),
                        MISSING_REASON)

    def __len__(self) -> int:
        return len(self.images)

    def _next_row(self, j: int) -> int:
        """The row tried after row j failed: the next one, or the next cached one when uncached rows are left out."""
        if self._usable_rows is None:
            return (j + 1) % len(self)
        rows = self._usable_rows
        return int(rows[np.searchsorted(rows, j, side="right") % len(rows)])

    def __getitem__(self, item) -> dict:
        idx, epoch, *left_out = item if isinstance(item, tuple) else (item, 0)
        skipped: Counter = Counter()
        if left_out and left_out[0]:  # the epoch's uncached rows, counted once (GlobalBatchSampler)
            skipped[self.missing_reason] += int(left_out[0])
        j = idx
        for attempt in range(_MAX_SUBSTITUTES):
            if attempt:
                j = self._next_row(j)
            image, reason = open_image(self.images[j])
            if reason:
                skipped[reason] += 1
                continue
            rng = sample_rng(self.seed, epoch, self.keys[j])
            try:
                sample = make_sample(image, self.captions[j], self.keys[j], self.transforms, self.is_train, rng,
                                     caption_rng(self.seed, epoch, self.keys[j]))
            except Exception as exc:  # a sample the teacher cache lacks (--cache-missing skip) is skipped, counted
                if getattr(exc, "skip_reason", None) is None:
                    raise
                skipped[exc.skip_reason] += 1
                continue
            sample["skipped"] = dict(skipped)
            return sample
        counts = ", ".join(f"{k} {v}" for k, v in skipped.items())
        hint = "; check --data-root" if {"missing_image", "corrupt_image"} & set(skipped) else ""
        raise UnusableRowsError(f"{_MAX_SUBSTITUTES} rows in a row from row {idx} ({self.images[idx]}) could not be "
                                f"used ({counts}){hint}")


class GlobalBatchSampler(Sampler):
    """Yields this rank's (index, epoch) items, epoch-seeded and resumable.

    Global batch b is permutation[b*G:(b+1)*G] and rank r takes its contiguous slice, so the rank-ordered gather of
    N processes is exactly the batch one process would see: training is equivalent whatever the world size.
    """

    def __init__(self, num_items: int, batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool,
                 num_samples: int | None = None, usable: np.ndarray | None = None):
        self.num_items, self.batch_size = num_items, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        # `usable`: rows that may be drawn (the others, e.g. not in the teacher cache, are left out of every epoch)
        self.usable = None if usable is None or np.all(usable) else np.asarray(usable, bool)
        available = int(self.usable.sum()) if self.usable is not None else num_items
        self.left_out = num_items - available
        global_batch = batch_size * world_size
        total = num_samples if num_samples else available
        self.num_batches = total // global_batch
        if self.num_batches == 0:
            what = f" ({self.left_out} of {num_items} rows are left out)" if self.left_out else ""
            raise UsageError(f"{total} samples{what} are fewer than one global batch ({batch_size} x {world_size} "
                             f"ranks); lower --batch-size")
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _order(self) -> np.ndarray:
        needed = self.num_batches * self.batch_size * self.world_size
        rows = np.arange(self.num_items) if self.usable is None else np.flatnonzero(self.usable)
        reps = -(-needed // len(rows))
        if not self.shuffle:
            return np.tile(rows, reps)[:needed]
        rng = np.random.default_rng([self.seed, self.epoch])
        # permutations of all rows, as without left-out rows, then filtered: the order stays a function of
        # (seed, epoch) and no row repeats within a permutation
        perms = [rng.permutation(self.num_items) for _ in range(reps)]
        if self.usable is not None:
            perms = [p[self.usable[p]] for p in perms]
        return np.concatenate(perms)[:needed]

    def __iter__(self):
        order = self._order()
        gb = self.batch_size * self.world_size
        for b in range(self.start_batch, self.num_batches):
            start = b * gb + self.rank * self.batch_size
            for k, i in enumerate(order[start:start + self.batch_size]):
                if self.left_out and start + k == 0:  # the epoch's first sample carries its left-out count
                    yield int(i), self.epoch, self.left_out
                else:
                    yield int(i), self.epoch

    def __len__(self) -> int:
        return (self.num_batches - self.start_batch) * self.batch_size


def get_csv_dataset(data: DataConfig, transforms: DataTransforms, *, seed: int, is_train: bool = True,
                    epoch: int = 0) -> DataInfo:
    from ..distributed import world_info

    paths = [p for p in (data.train_data if is_train else data.val_data).split(",") if p]
    roots = [r for r in data.data_root.split(",")] if data.data_root else []
    dataset = CsvDataset(paths, roots, transforms, is_train, data.csv_img_key, data.csv_caption_key,
                         data.csv_separator, seed=seed)
    rank, world_size = world_info()
    sampler = GlobalBatchSampler(len(dataset), data.batch_size, rank, world_size, seed, shuffle=is_train,
                                 num_samples=data.train_num_samples if is_train else None, usable=dataset.usable)
    sampler.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=data.batch_size, sampler=sampler, num_workers=data.workers,
                        collate_fn=collate, pin_memory=torch.cuda.is_available(), drop_last=True,
                        persistent_workers=False)
    return DataInfo(dataloader=loader, num_batches=sampler.num_batches,
                    num_samples=sampler.num_batches * data.batch_size * world_size,
                    set_epoch_fn=sampler.set_epoch, extra={"dropped_at_load": dict(dataset.dropped),
                                                           "left_out_per_epoch": sampler.left_out})

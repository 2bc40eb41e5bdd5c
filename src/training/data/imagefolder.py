"""Image folders without captions (`--dataset-type imagefolder`, detected when `--train-data` names folders): the
data of image-only students and classifiers.

Every image under each folder is a sample, found recursively in sorted order; its key is `<folder name>/<relative
path>`. A folder holding `classnames.txt` is a class folder as evaluation reads it (one sub-folder per class, line k
of `classnames.txt` names the k-th sub-folder in sorted order): its images carry that label. Images of any other
folder carry label -1 (unlabelled). Labels are used by evaluation and by the classifier's cross-entropy only; the
embedding loss never reads them. A comma list of folders is concatenated (e.g. a labelled split and an unlabelled
one); class folders in the list must share their class names.

Samples go through the CSV loader's machinery (`CsvDataset`): a missing or corrupt image is replaced by the next
good one and counted, batches stay full, the order is a function of (seed, epoch), and resume is exact. There is no
caption: the sample's caption is the empty string (what a teacher cache built from the same folders hashes), and
no tokens are made when the student has no text tower.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader

from ..config import DataConfig, comma_list
from ..errors import UsageError
from ..eval.datasets import IMG_EXTS, list_images
from ..eval.templates import read_classnames
from .common import DataInfo, DataTransforms, collate
from .csv import CsvDataset, GlobalBatchSampler, open_image

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "templates.txt"  # a class folder's own prompt templates (as evaluation reads them), optional
UNLABELLED = -1
_PROBE = 64  # images tried at start-up before a folder is declared unreadable


@dataclass
class FolderTable:
    """The samples of a list of folders: image paths, keys, labels (-1: unlabelled) and the class names."""

    images: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    classnames: list[str] | None = None

    @property
    def num_labelled(self) -> int:
        return sum(1 for y in self.labels if y != UNLABELLED)


def _class_folder(folder: str) -> tuple[list[str], list[str]]:
    """(class names, class sub-folders in sorted order) of a folder with classnames.txt."""
    names = read_classnames(os.path.join(folder, CLASSNAMES_FILE))
    subs = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if len(names) != len(subs):
        raise UsageError(f"{folder}: {CLASSNAMES_FILE} names {len(names)} classes but there are {len(subs)} class "
                         f"sub-folders (line k names the k-th sub-folder in sorted order)")
    return names, subs


def folder_classnames(paths: list[str]) -> list[str] | None:
    """The class names of the class folders among `paths` (None when none is one), without listing images."""
    found = None
    for path in paths:
        if os.path.isfile(os.path.join(path, CLASSNAMES_FILE)):
            names, _ = _class_folder(path)
            if found is not None and names != found:
                raise UsageError(f"{path}: its classes ({', '.join(names[:4])}, ...) differ from those of an earlier "
                                 f"class folder ({', '.join(found[:4])}, ...)")
            found = names
    return found


def folder_templates(paths: list[str]) -> list[str] | None:
    """The prompt templates of the first class folder among `paths` that has templates.txt, else None."""
    from ..eval.templates import read_templates

    for path in paths:
        if os.path.isfile(os.path.join(path, CLASSNAMES_FILE)) and os.path.isfile(os.path.join(path, TEMPLATES_FILE)):
            return list(read_templates(os.path.join(path, TEMPLATES_FILE)))
    return None


def _check_readable(folder: str, images: list[str]) -> None:
    """One-line error unless one of the first images decodes (a folder of unreadable files trains on nothing)."""
    reasons: Counter = Counter()
    for path in images[:_PROBE]:
        image, reason = open_image(path)
        if image is not None:
            return
        reasons[reason] += 1
    tried = ", ".join(f"{k} {v}" for k, v in reasons.items())
    raise UsageError(f"no readable image in {folder}: the first {min(len(images), _PROBE)} files all failed ({tried})")


def read_image_folders(paths: list[str]) -> FolderTable:
    """The samples of every folder (see the module docstring); raises UsageError for a missing folder, one with no
    image or no readable image, or class folders that disagree on their classes."""
    table = FolderTable()
    stems = [os.path.basename(os.path.normpath(p)) for p in paths]
    if len(set(stems)) != len(stems):
        raise UsageError(f"two --train-data folders share a name ({', '.join(paths)}); their sample keys "
                         "(<folder name>/<path>) would collide")
    for path, stem in zip(paths, stems):
        if not os.path.isdir(path):
            raise UsageError(f"data folder not found: {path}")
        if os.path.isfile(os.path.join(path, CLASSNAMES_FILE)):
            names, subs = _class_folder(path)
            if table.classnames is not None and names != table.classnames:
                raise UsageError(f"{path}: its classes ({', '.join(names[:4])}, ...) differ from those of an earlier "
                                 f"class folder ({', '.join(table.classnames[:4])}, ...)")
            table.classnames = names
            groups = [(list_images(os.path.join(path, sub)), label) for label, sub in enumerate(subs)]
        else:
            groups = [(list_images(path), UNLABELLED)]
        found = [p for files, _ in groups for p in files]
        if not found:
            raise UsageError(f"no image in {path} (looked for {', '.join(IMG_EXTS)}, recursively)")
        _check_readable(path, found)
        for files, label in groups:
            table.images += files
            table.keys += [f"{stem}/{os.path.relpath(f, path)}" for f in files]
            table.labels += [label] * len(files)
    return table


class ImageFolderDataset(CsvDataset):
    """CsvDataset over image folders: same substitution of bad images, same (row, epoch) indexing; samples also
    carry their `label` (-1 when unlabelled)."""

    def __init__(self, table: FolderTable, transforms: DataTransforms, is_train: bool, seed: int = 0):
        # the table replaces the CSV reading; the rest of CsvDataset's state is set as its __init__ sets it
        self.images, self.keys, self.dropped = table.images, table.keys, Counter()
        self.captions = [""] * len(table.images)
        self.label_of = dict(zip(table.keys, table.labels))
        self.transforms, self.is_train, self.seed = transforms, is_train, seed
        self.usable, self._usable_rows = None, None
        cache = transforms.teacher_cache if is_train else None
        if cache is not None and cache.missing == "skip":
            self._mask_uncached(cache, sorted({k.split("/", 1)[0] for k in table.keys}))

    def __getitem__(self, item) -> dict:
        sample = super().__getitem__(item)
        sample["label"] = torch.tensor(self.label_of[sample["key"]], dtype=torch.long)  # of the row actually used
        return sample


def get_imagefolder_dataset(data: DataConfig, transforms: DataTransforms, *, seed: int, epoch: int = 0
                            ) -> DataInfo:
    from ..distributed import world_info

    table = read_image_folders(comma_list(data.train_data))
    logging.info("image folders: %d images (%d labelled%s)", len(table.images), table.num_labelled,
                 f", {len(table.classnames)} classes" if table.classnames else "")
    dataset = ImageFolderDataset(table, transforms, True, seed=seed)
    rank, world_size = world_info()
    sampler = GlobalBatchSampler(len(dataset), data.batch_size, rank, world_size, seed, shuffle=True,
                                 num_samples=data.train_num_samples, usable=dataset.usable)
    sampler.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=data.batch_size, sampler=sampler, num_workers=data.workers,
                        collate_fn=collate, pin_memory=torch.cuda.is_available(), drop_last=True,
                        persistent_workers=False)
    return DataInfo(dataloader=loader, num_batches=sampler.num_batches,
                    num_samples=sampler.num_batches * data.batch_size * world_size, set_epoch_fn=sampler.set_epoch,
                    extra={"classnames": table.classnames, "num_labelled": table.num_labelled,
                           "left_out_per_epoch": sampler.left_out})

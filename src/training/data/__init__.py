"""Data sources behind one entry point, `get_data`. See docs/DESIGN.md for the batch format."""

from __future__ import annotations

import dataclasses

from ..config import DataConfig, comma_list
from ..errors import TeacherCacheError, UsageError
from .common import DataInfo, DataTransforms, collate, make_sample

__all__ = ["DataInfo", "DataTransforms", "TeacherCacheError", "collate", "dataset_type", "get_data", "infer_dataset_type", "make_sample"]


def infer_dataset_type(train_data: str | None) -> str:
    if not train_data:
        return "synthetic"
    import os

    if all(os.path.isdir(p) for p in comma_list(train_data)):  # caption-less image folders
        return "imagefolder"
    if ".tar" in train_data or train_data.startswith(("pipe:", "s3://", "gs://")):
        return "webdataset"
    if train_data.split(",")[0].endswith((".csv", ".tsv", ".txt")):
        return "csv"
    raise UsageError(f"cannot infer the dataset type of '{train_data}': pass --dataset-type csv|webdataset|imagefolder")


def dataset_type(data: DataConfig) -> str:
    """csv, webdataset, imagefolder or synthetic: --dataset-type, or what --train-data looks like under `auto`."""
    return infer_dataset_type(data.train_data) if data.dataset_type == "auto" else data.dataset_type


def get_data(data: DataConfig, transforms: DataTransforms, *, seed: int, epoch: int = 0,
             image_size: int = 224) -> dict[str, DataInfo]:
    """{"train": DataInfo} for the configured source (evaluation sets are read by training.eval)."""
    kind = dataset_type(data)
    if data.captions_per_step != transforms.captions_per_step:
        transforms = dataclasses.replace(transforms, captions_per_step=data.captions_per_step)
    if kind == "synthetic":
        from .synthetic import get_synthetic_dataset

        return {"train": get_synthetic_dataset(data, transforms, seed=seed, epoch=epoch, image_size=image_size)}
    if not data.train_data:
        raise UsageError(f"--dataset-type {kind} needs --train-data")
    if kind == "csv":
        from .csv import get_csv_dataset

        return {"train": get_csv_dataset(data, transforms, seed=seed, epoch=epoch)}
    if kind == "imagefolder":
        from .imagefolder import get_imagefolder_dataset

        return {"train": get_imagefolder_dataset(data, transforms, seed=seed, epoch=epoch)}
    if kind == "webdataset":
        from .wds import get_wds_dataset

        return {"train": get_wds_dataset(data, transforms, seed=seed, epoch=epoch)}
    raise UsageError(f"unknown --dataset-type {kind}")

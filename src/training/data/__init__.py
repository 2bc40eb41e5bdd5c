"""Data sources behind one entry point, `get_data`. See docs/DESIGN.md for the batch format."""

from __future__ import annotations

from ..errors import UsageError
from .common import DataInfo, DataTransforms, collate, make_sample

__all__ = ["DataInfo", "DataTransforms", "collate", "get_data", "infer_dataset_type", "make_sample"]


def infer_dataset_type(train_data: str | None) -> str:
    if not train_data:
        return "synthetic"
    if ".tar" in train_data or train_data.startswith(("pipe:", "s3://", "gs://")):
        return "webdataset"
    if train_data.split(",")[0].endswith((".csv", ".tsv", ".txt")):
        return "csv"
    raise UsageError(f"cannot infer the dataset type of '{train_data}': pass --dataset-type csv|webdataset")


def get_data(args, transforms: DataTransforms, epoch: int = 0, image_size: int = 224) -> dict[str, DataInfo]:
    """{"train": DataInfo} for the configured source (evaluation data is read by training.evaluate)."""
    kind = args.dataset_type
    if kind == "auto":
        kind = infer_dataset_type(args.train_data)
    if kind == "synthetic":
        from .synthetic import get_synthetic_dataset

        return {"train": get_synthetic_dataset(args, transforms, True, epoch, image_size=image_size)}
    if not args.train_data:
        raise UsageError(f"--dataset-type {kind} needs --train-data")
    if kind == "csv":
        from .csv import get_csv_dataset

        return {"train": get_csv_dataset(args, transforms, True, epoch)}
    if kind == "webdataset":
        from .webdataset import get_wds_dataset

        return {"train": get_wds_dataset(args, transforms, epoch, is_train=True)}
    raise UsageError(f"unknown --dataset-type {kind}")

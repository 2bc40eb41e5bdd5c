"""Evaluation during training: `TrainingEvaluator(config.eval, config.data, config.runtime, epochs)` checks the
sets at construction; calling it at an epoch's end runs what is due.

Collective: every rank builds it and calls it with the same epoch, and every rank gets the same dict.
"""

from __future__ import annotations

import logging
import os

import torch

from ..config import DataConfig, EvalConfig, RuntimeConfig
from ..errors import DatasetError, UsageError
from .datasets import (
    CLASSIFICATION_KINDS,
    ClassificationSet,
    DatasetSpec,
    RetrievalSet,
    detect,
    detect_kind,
    load_classification,
    load_retrieval,
    parse_dataset_specs,
)
from .retrieval import run_retrieval
from .zeroshot import run_zeroshot

ZEROSHOT_KEYS = ("top1", "top5", "mean_per_class_recall")
RETRIEVAL_KEYS = tuple(f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10))


def _due(epoch: int, frequency: int | None, total_epochs: int | None) -> bool:
    if not frequency or frequency <= 0:
        return False
    return epoch % frequency == 0 or (total_epochs is not None and epoch == total_epochs)


def _zeroshot_spec(path: str) -> DatasetSpec:
    try:
        kind, why = detect(path)
    except DatasetError:
        if not os.path.isdir(path):
            raise
        # --zeroshot-data is an image folder by definition; _load_folder refuses folders without class names
        kind, why = "folder", "an image folder, as --zeroshot-data expects"
    if kind not in CLASSIFICATION_KINDS:
        raise UsageError(f"--zeroshot-data {path} is not a classification set ({kind})")
    return DatasetSpec("zeroshot", kind, path, detected=why)


def _val_spec(path: str) -> DatasetSpec:
    kind = detect_kind(path) or "csv"
    if kind in CLASSIFICATION_KINDS:
        raise UsageError(f"--val-data {path} is not a retrieval set (CSV or Karpathy JSON)")
    return DatasetSpec("val", kind, path)


class TrainingEvaluator:
    """Evaluation during training. `epoch` counts completed epochs (1 after the first; 0 = before training). Runs
    - zero-shot on `--zeroshot-data` when epoch % zeroshot_frequency == 0 (or at the last epoch):
      `zeroshot/top1`, `zeroshot/top5`, `zeroshot/mean_per_class_recall`;
    - retrieval on `--val-data` (a CSV read with data_root / csv_img_key / csv_caption_key / csv_separator, or a
      Karpathy JSON) when epoch % val_frequency == 0: `retrieval/image_to_text_R@1` ... `@10`,
      `retrieval/text_to_image_R@1` ... `@10`;
    - every `--eval-datasets` set when epoch % eval_frequency == 0: `zeroshot/<name>/top1`, ... (classification
      sets) or `retrieval/<name>/image_to_text_R@1`, ... (retrieval sets);
    - open_clip's / CLIP-KD's `--imagenet-val/-v2/-r/-a/-sketch` when epoch % zeroshot_frequency == 0:
      `zeroshot/imagenet-val/top1`, ... (read by the suite's ImageNet readers: wnid folders, class subsets).
    `force=True` runs everything (CLIP-KD's --eval and --t-eval).
    Values are fractions in [0, 1]. Batch size, workers and precision are the training run's.
    """

    def __init__(self, eval: EvalConfig, data: DataConfig, runtime: RuntimeConfig, epochs: int | None = None):
        self.config, self.epochs = eval, epochs
        self.batch_size, self.workers, self.precision = data.batch_size, data.workers, runtime.precision
        # --val-data's image root: --val-data-root (CLIP-KD), else the first training CSV's
        self.data_root = data.val_data_root or (data.data_root.split(",")[0] if data.data_root else data.data_root)
        self.csv = (data.csv_img_key, data.csv_caption_key, data.csv_separator)
        for path, flag in ((eval.zeroshot_data, "--zeroshot-data"), (data.val_data, "--val-data"),
                           (data.val_data_root, "--val-data-root"),
                           *((p, f"--{n}") for n, _, p in eval.imagenet_sets)):
            if path and not os.path.exists(path):
                raise UsageError(f"{flag}: path not found: {path}")
        # every set is read now, so a bad path fails at start-up and not after the first epoch
        self.zeroshot = self.val = None
        self.suite: list[tuple[DatasetSpec, ClassificationSet | RetrievalSet]] = []
        self.imagenet = [(spec, load_classification(spec, "test")) for spec in
                         (DatasetSpec(name, kind, path) for name, kind, path in eval.imagenet_sets)]
        if eval.zeroshot_data:
            spec = _zeroshot_spec(eval.zeroshot_data)
            self.zeroshot = (spec, load_classification(spec, "test"))
        if data.val_data:
            spec = _val_spec(data.val_data)
            self.val = (spec, self._retrieval_set(spec))
        for spec in parse_dataset_specs(eval.eval_datasets):
            self.suite.append((spec, self._retrieval_set(spec) if spec.is_retrieval
                               else load_classification(spec, "test")))
        # said once at start-up: which kind each set was taken for, and what makes its number not the benchmark's
        for spec, ds in ([self.zeroshot] if self.zeroshot else []) + self.imagenet + self.suite:
            if not isinstance(ds, ClassificationSet):
                continue
            if spec.detected:
                logging.info("eval set %s: detected %s as %s (%s)", spec.name, spec.path, spec.kind, spec.detected)
            for note in ds.notes:
                logging.warning("eval set %s: %s", spec.name, note)

    def _retrieval_set(self, spec: DatasetSpec) -> RetrievalSet:
        return load_retrieval(spec, self.data_root, *self.csv)

    def due(self, epoch: int) -> bool:
        """Whether a call at this epoch evaluates anything (a caller may skip gathering sharded weights)."""
        c = self.config
        return bool(((self.zeroshot or self.imagenet) and _due(epoch, c.zeroshot_frequency, self.epochs))
                    or (self.val and _due(epoch, c.val_frequency, self.epochs))
                    or (self.suite and _due(epoch, c.eval_frequency, self.epochs)))

    def __call__(self, model, preprocess, tokenizer, epoch: int, device, force: bool = False) -> dict[str, float]:
        """The metrics due at `epoch` ({} when nothing is). `model` is the unwrapped open_clip model; it is put back
        in its training mode."""
        device = torch.device(device)
        c = self.config
        due = (lambda frequency: True) if force else (lambda frequency: _due(epoch, frequency, self.epochs))
        common = dict(batch_size=self.batch_size, workers=self.workers, precision=self.precision)

        def zeroshot(ds, prefix):
            m = run_zeroshot(model, tokenizer, ds, preprocess, device, **common)
            return {f"{prefix}/{k}": m[k] for k in ZEROSHOT_KEYS}

        def retrieval(ds, prefix):
            m = run_retrieval(model, tokenizer, ds, preprocess, device, **common)
            return {f"{prefix}/{k}": m[k] for k in RETRIEVAL_KEYS}

        out: dict[str, float] = {}
        was_training = model.training
        model.eval()
        try:
            if self.zeroshot and due(c.zeroshot_frequency):
                out.update(zeroshot(self.zeroshot[1], "zeroshot"))
            if self.imagenet and due(c.zeroshot_frequency):
                for spec, ds in self.imagenet:
                    out.update(zeroshot(ds, f"zeroshot/{spec.name}"))
            if self.val and due(c.val_frequency):
                out.update(retrieval(self.val[1], "retrieval"))
            if self.suite and due(c.eval_frequency):
                for spec, ds in self.suite:
                    if spec.is_retrieval:
                        out.update(retrieval(ds, f"retrieval/{spec.name}"))
                    else:
                        out.update(zeroshot(ds, f"zeroshot/{spec.name}"))
        finally:
            model.train(was_training)
        return out

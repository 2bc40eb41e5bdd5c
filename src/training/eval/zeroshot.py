"""Zero-shot classification: top-1, top-5 and mean per-class recall.

Class embedding = mean of the L2-normalised text embeddings of the class under every template, renormalised
(open_clip's `build_zero_shot_classifier`). Ranks split the classes to build the classifier and the images to
score them; per-class counts are summed over ranks, so every rank gets exactly the 1-process numbers.
A tie with the true class counts as a miss (a collapsed model scores 0, not 100).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F

from ..distributed import reduce_sum, world_info
from .datasets import ClassificationSet
from .engine import encode_image_batches, eval_autocast, gather_rows, shard_loader


class _TextNormalizing:
    """The interface open_clip's classifier builder calls: `encode_text(tokens, normalize=True)`."""

    def __init__(self, model):
        self.model = model

    def encode_text(self, tokens, normalize: bool = False):
        feats = self.model.encode_text(tokens).float()
        return F.normalize(feats, dim=-1) if normalize else feats


@torch.no_grad()
def build_classifier(model, tokenizer: Callable, classnames: Sequence[str], templates: Sequence,
                     device: torch.device, precision: str | None = None, classes_per_batch: int = 10) -> torch.Tensor:
    """Zero-shot head [C, D] (rows L2-normalised) on every rank; each rank embeds a contiguous block of classes."""
    rank, world = world_info()
    per = -(-len(classnames) // world)
    mine = list(classnames[rank * per:(rank + 1) * per])
    if mine:
        with eval_autocast(device, precision):
            weights = open_clip.build_zero_shot_classifier(
                _TextNormalizing(model), tokenizer, mine, list(templates), num_classes_per_batch=classes_per_batch,
                device=device)
        rows = weights.T.float().contiguous()
    else:
        with eval_autocast(device, precision):
            dim = model.encode_text(tokenizer(["x"]).to(device)).shape[-1]
        rows = torch.zeros(0, dim, device=device)
    return gather_rows(rows)


def classification_counts(logits: torch.Tensor, labels: torch.Tensor, num_classes: int,
                          ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """[1 + len(ks), C] float64: samples per true class, then hits@k per true class (ties count as misses)."""
    true = logits.gather(1, labels[:, None])
    rank = (logits >= true).sum(1) - 1  # classes scoring at least as high as the true one
    counts = torch.zeros(1 + len(ks), num_classes, dtype=torch.float64, device=logits.device)
    counts[0].index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
    for j, k in enumerate(ks):
        counts[1 + j].index_add_(0, labels, (rank < k).double())
    return counts


def metrics_from_counts(counts: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    n = counts[0]
    total = float(n.sum())
    out: dict[str, float] = {}
    for j, k in enumerate(ks):
        out[f"top{k}"] = float(counts[1 + j].sum()) / total if total else 0.0
    present = n > 0
    out["mean_per_class_recall"] = float((counts[1][present] / n[present]).mean()) if present.any() else 0.0
    out["num_samples"] = total
    return out


def saved_head(model, dataset: ClassificationSet) -> torch.Tensor | None:
    """The class embeddings saved with an image-only student (models/image_student.py), None for a two-tower model.
    A head for other classes, or none at all, is a one-line error: such a student has no text tower to build one."""
    if not hasattr(model, "class_embeddings") or getattr(model, "kind", None) != "image":
        if getattr(model, "kind", None) == "classifier":
            from ..models.image_student import ClassHeadError

            raise ClassHeadError("zero-shot needs a two-tower model or an image student with a class head; a "
                                 "classifier is scored by --tasks linear_probe or training.predict")
        return None
    from ..models.image_student import ClassHeadError

    if not model.has_head:
        raise ClassHeadError(f"{dataset.name}: this image-only student has no class head and no text tower to build "
                             "one (train it with --zeroshot-data or a class folder and a live --teacher)")
    if model.classnames != list(dataset.classnames):
        raise ClassHeadError(f"{dataset.name}: the student's class head covers {model.num_classes} classes "
                             f"({', '.join(model.classnames[:3])}, ...), not this set's {dataset.num_classes} "
                             f"({', '.join(dataset.classnames[:3])}, ...)")
    return model.class_embeddings.float()


def run_zeroshot(model, tokenizer: Callable, dataset: ClassificationSet, transform: Callable, device: torch.device,
                 batch_size: int = 64, workers: int = 0, precision: str | None = None,
                 classifier: torch.Tensor | None = None, log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Zero-shot metrics of `model` on `dataset` (collective). Returns top1, top5, mean_per_class_recall (fractions)."""
    t0 = time.time()
    if classifier is None:
        classifier = saved_head(model, dataset)
    if classifier is None:
        classifier = build_classifier(model, tokenizer, dataset.classnames, dataset.templates, device, precision)
    counts = torch.zeros(3, dataset.num_classes, dtype=torch.float64, device=device)
    loader = shard_loader(dataset.source, transform, batch_size, workers)
    for _, feats, labels in encode_image_batches(model, loader, device, precision,
                                                      f"zero-shot {dataset.name}"):
        if labels.numel() and (labels.min() < 0 or labels.max() >= dataset.num_classes):
            raise ValueError(f"{dataset.name}: label {int(labels.max())} outside the {dataset.num_classes} classes")
        counts += classification_counts(feats @ classifier.T, labels, dataset.num_classes)
    metrics = metrics_from_counts(reduce_sum(counts))
    if log:
        log(f"zeroshot {dataset.name}: top1 {100 * metrics['top1']:.2f} top5 {100 * metrics['top5']:.2f} "
            f"mpcr {100 * metrics['mean_per_class_recall']:.2f} (n={int(metrics['num_samples'])}, "
            f"{dataset.num_classes} classes, {len(dataset.templates)} templates, {time.time() - t0:.1f}s)")
    return metrics

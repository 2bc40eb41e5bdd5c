"""Linear probe: frozen image features -> multinomial logistic regression trained with full-batch L-BFGS.

Features are the L2-normalised image embeddings, standardised with the fitting set's mean and std. The L2 weight
decay is chosen on a held-out split of train (`val_fraction`, seeded) over `wd_grid`; the head is then refit on
all of train and scored on test (top-1, top-5, mean per-class recall). Ranks split the grid and sum the validation
scores; the final fit is deterministic and rank 0's metrics are shared, so all ranks report the 1-process numbers.

Features are cached on disk per (model id, dataset, split, preprocessing) in `cache_dir` as `.pt` files.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..distributed import reduce_sum, world_info
from ..fileio import torch_save
from .datasets import ClassificationSet
from .engine import encode_images
from .zeroshot import classification_counts, metrics_from_counts

DEFAULT_WD_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def cache_path(cache_dir: str, model_id: str, dataset: ClassificationSet, transform: Callable) -> str:
    key = json.dumps([model_id, dataset.kind, os.path.abspath(dataset.path), dataset.split, repr(transform)])
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{dataset.name}-{dataset.split}-{digest}.pt")


def cached_features(model, dataset: ClassificationSet, transform: Callable, device: torch.device, *,
                    cache_dir: str | None, model_id: str, batch_size: int = 64, workers: int = 0,
                    precision: str | None = None, log: Callable[[str], None] | None = None):
    """(features, labels) of a split, read from the cache when every rank sees the file, else encoded and saved."""
    rank, world = world_info()
    path = cache_path(cache_dir, model_id, dataset, transform) if cache_dir else None
    seen = torch.tensor([1.0 if path and os.path.isfile(path) else 0.0], device=device)
    if path and int(reduce_sum(seen).item()) == world:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if log:
            log(f"linear probe {dataset.name}/{dataset.split}: cached features {path}")
        return blob["features"].to(device), blob["labels"].to(device)
    feats, labels = encode_images(model, dataset.source, transform, device, batch_size, workers, precision)
    if path and rank == 0:
        torch_save({"features": feats.cpu(), "labels": labels.cpu(),
                    "meta": {"model_id": model_id, "dataset": dataset.name, "kind": dataset.kind,
                             "path": os.path.abspath(dataset.path), "split": dataset.split}}, path)
    return feats, labels


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, wd: float, max_iter: int = 1000):
    """(W [D, C], b [C]) minimising mean cross-entropy + wd/2 * ||W||^2 with full-batch L-BFGS (deterministic)."""
    w = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-7,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * wd * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _standardize(fit: torch.Tensor, *others: torch.Tensor):
    mean, std = fit.mean(0, keepdim=True), fit.std(0, keepdim=True).clamp_min(1e-6)
    return ((fit - mean) / std, *((o - mean) / std for o in others))


def _score(x_fit, y_fit, x_eval, y_eval, num_classes, wd, max_iter) -> dict[str, float]:
    xf, xe = _standardize(x_fit, x_eval)
    w, b = fit_logistic(xf, y_fit, num_classes, wd, max_iter)
    return metrics_from_counts(classification_counts(xe @ w + b, y_eval, num_classes))


def select_weight_decay(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int,
                        wd_grid: Sequence[float] = DEFAULT_WD_GRID, val_fraction: float = 0.2, max_iter: int = 1000,
                        seed: int = 0) -> tuple[float, float]:
    """(weight decay, its held-out top-1): the sweep on a seeded held-out part of train (collective)."""
    rank, world = world_info()
    device = train_x.device
    wd_grid = list(wd_grid)
    if len(wd_grid) > 1:
        perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed)).to(device)
        n_val = max(1, int(round(val_fraction * len(train_y))))
        val_idx, fit_idx = perm[:n_val], perm[n_val:]
        val_acc = torch.zeros(len(wd_grid), dtype=torch.float64, device=device)
        for g in range(rank, len(wd_grid), world):  # each rank takes every world-th weight decay
            val_acc[g] = _score(train_x[fit_idx], train_y[fit_idx], train_x[val_idx], train_y[val_idx],
                                num_classes, wd_grid[g], max_iter)["top1"]
        val_acc = reduce_sum(val_acc).tolist()
        best = max(range(len(wd_grid)), key=lambda g: (val_acc[g], wd_grid[g]))  # ties: the stronger decay
    else:
        val_acc, best = [float("nan")], 0
    return float(wd_grid[best]), float(val_acc[best])


def fit_linear_head(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int,
                    wd_grid: Sequence[float] = DEFAULT_WD_GRID, val_fraction: float = 0.2, max_iter: int = 1000,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The probe as a head on raw features: (W [C, D], b [C], weight decay) with logits = x W^T + b, the
    standardisation folded in (collective: the sweep is select_weight_decay's)."""
    wd, _ = select_weight_decay(train_x, train_y, num_classes, wd_grid, val_fraction, max_iter, seed)
    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True).clamp_min(1e-6)
    w, b = fit_logistic((train_x - mean) / std, train_y, num_classes, wd, max_iter)
    w_raw = w / std.T  # ((x - m) / s) W = x (W / s) - (m / s) W
    return w_raw.T.contiguous(), (b - (mean / std) @ w).squeeze(0), wd


def linear_probe_from_features(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                               test_y: torch.Tensor, num_classes: int, wd_grid: Sequence[float] = DEFAULT_WD_GRID,
                               val_fraction: float = 0.2, max_iter: int = 1000, seed: int = 0) -> dict[str, float]:
    """Weight-decay sweep on a held-out part of train, refit on all train, test metrics (collective)."""
    rank, _ = world_info()
    device = train_x.device
    wd, val_top1 = select_weight_decay(train_x, train_y, num_classes, wd_grid, val_fraction, max_iter, seed)
    metrics = _score(train_x, train_y, test_x, test_y, num_classes, wd, max_iter)
    metrics["weight_decay"] = wd
    metrics["val_top1"] = val_top1
    keys = sorted(metrics)
    shared = torch.tensor([metrics[k] if rank == 0 else 0.0 for k in keys], dtype=torch.float64, device=device)
    return dict(zip(keys, reduce_sum(shared).tolist()))  # rank 0's numbers everywhere


def run_linear_probe(model, train_set: ClassificationSet, test_set: ClassificationSet, transform: Callable,
                     device: torch.device, *, model_id: str, cache_dir: str | None = None, batch_size: int = 64,
                     workers: int = 0, precision: str | None = None, wd_grid: Sequence[float] = DEFAULT_WD_GRID,
                     val_fraction: float = 0.2, max_iter: int = 1000, seed: int = 0,
                     log: Callable[[str], None] | None = None) -> dict[str, float]:
    t0 = time.time()
    common = dict(cache_dir=cache_dir, model_id=model_id, batch_size=batch_size, workers=workers, precision=precision,
                  log=log)
    train_x, train_y = cached_features(model, train_set, transform, device, **common)
    test_x, test_y = cached_features(model, test_set, transform, device, **common)
    num_classes = max(train_set.num_classes, test_set.num_classes)
    metrics = linear_probe_from_features(train_x, train_y, test_x, test_y, num_classes, wd_grid, val_fraction,
                                         max_iter, seed)
    metrics["num_train"] = float(len(train_y))
    if log:
        log(f"linear probe {test_set.name}: top1 {100 * metrics['top1']:.2f} top5 {100 * metrics['top5']:.2f} "
            f"mpcr {100 * metrics['mean_per_class_recall']:.2f} (wd {metrics['weight_decay']:g}, "
            f"train {len(train_y)}, test {len(test_y)}, {time.time() - t0:.1f}s)")
    return metrics

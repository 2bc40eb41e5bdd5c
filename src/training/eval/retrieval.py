"""Image-text retrieval: R@1/5/10 image->text and text->image.

Image->text: a hit at k if ANY of the image's captions is among the k best texts. Text->image: each caption ranks
all images; a hit at k if its own image is among the k best. Similarities are computed in blocks of queries so
COCO-size sets (5k images x 25k captions) fit in memory. Ranks split the queries and sum the hit counts, so every
rank gets exactly the 1-process numbers. A tie with a non-matching item counts as a miss.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from ..distributed import reduce_sum, world_info
from .datasets import RetrievalSet
from .engine import encode_images, encode_texts

KS = (1, 5, 10)


def retrieval_hits(image_feats: torch.Tensor, text_feats: torch.Tensor, text_to_image: torch.Tensor,
                   image_queries: torch.Tensor, text_queries: torch.Tensor, ks: Sequence[int] = KS,
                   block: int = 1024) -> torch.Tensor:
    """[2, len(ks)] float64 hit counts: row 0 image->text over `image_queries`, row 1 text->image over `text_queries`."""
    hits = torch.zeros(2, len(ks), dtype=torch.float64, device=image_feats.device)
    for s in range(0, len(image_queries), block):
        q = image_queries[s:s + block]
        sim = image_feats[q] @ text_feats.T                                   # [B, M]
        own = text_to_image[None, :] == q[:, None]                            # the image's own captions
        best = sim.masked_fill(~own, float("-inf")).max(dim=1).values         # its best-scoring caption
        rank = ((sim >= best[:, None]) & ~own).sum(1)                         # other captions at least as good
        for j, k in enumerate(ks):
            hits[0, j] += (rank < k).sum()
    for s in range(0, len(text_queries), block):
        q = text_queries[s:s + block]
        sim = text_feats[q] @ image_feats.T                                   # [B, N]
        own = sim.gather(1, text_to_image[q][:, None])
        rank = (sim >= own).sum(1) - 1                                        # other images at least as good
        for j, k in enumerate(ks):
            hits[1, j] += (rank < k).sum()
    return hits


def retrieval_metrics(image_feats: torch.Tensor, text_feats: torch.Tensor, text_to_image: torch.Tensor,
                      ks: Sequence[int] = KS, block: int = 1024) -> dict[str, float]:
    """Recall@k both ways from full (gathered) features; each rank scores every world-th query (collective)."""
    rank, world = world_info()
    device = image_feats.device
    text_to_image = text_to_image.to(device)
    img_q = torch.arange(rank, image_feats.shape[0], world, device=device)
    txt_q = torch.arange(rank, text_feats.shape[0], world, device=device)
    hits = reduce_sum(retrieval_hits(image_feats, text_feats, text_to_image, img_q, txt_q, ks, block))
    out = {}
    for j, k in enumerate(ks):
        out[f"image_to_text_R@{k}"] = float(hits[0, j]) / max(image_feats.shape[0], 1)
    for j, k in enumerate(ks):
        out[f"text_to_image_R@{k}"] = float(hits[1, j]) / max(text_feats.shape[0], 1)
    out["num_images"], out["num_texts"] = float(image_feats.shape[0]), float(text_feats.shape[0])
    return out


def run_retrieval(model, tokenizer: Callable, dataset: RetrievalSet, transform: Callable, device: torch.device,
                  batch_size: int = 64, workers: int = 0, precision: str | None = None,
                  log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Retrieval metrics of `model` on `dataset` (collective)."""
    t0 = time.time()
    image_feats, _ = encode_images(model, dataset.source, transform, device, batch_size, workers, precision,
                                   f"retrieval {dataset.name}")
    text_feats = encode_texts(model, tokenizer, dataset.texts, device, max(batch_size, 256), precision)
    metrics = retrieval_metrics(image_feats, text_feats, torch.tensor(dataset.text_to_image, dtype=torch.long))
    if log:
        log(f"retrieval {dataset.name}: I->T R@1/5/10 "
            + "/".join(f"{100 * metrics[f'image_to_text_R@{k}']:.2f}" for k in KS)
            + "  T->I R@1/5/10 " + "/".join(f"{100 * metrics[f'text_to_image_R@{k}']:.2f}" for k in KS)
            + f" ({len(dataset.images)} images, {len(dataset.texts)} captions, {time.time() - t0:.1f}s)")
    return metrics

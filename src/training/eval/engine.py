"""Data-parallel embedding: each rank encodes its shard, then rows are gathered back into dataset order.

Every function here is collective when a process group is up: all ranks must call it with the same dataset.
Samples carry a global integer key (their position, or (shard << 32 | position) for WebDataset), so the gathered
result is identical to a 1-process run whatever the number of ranks or loader workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ..distributed import all_gather_cat, world_info
from ..precision import autocast_for, module_input_dtype
from ..progress import iterate
from .datasets import ArrayImages, FileImages, WdsImages


class _MapShard(Dataset):
    def __init__(self, source: FileImages | ArrayImages, transform: Callable, indices: list[int]):
        self.source, self.transform, self.indices = source, transform, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        key = self.indices[i]
        image, label = self.source.load(key)
        return key, self.transform(image), label


class _WdsShard(IterableDataset):
    def __init__(self, source: WdsImages, transform: Callable, rank: int, world: int):
        self.source, self.transform, self.rank, self.world = source, transform, rank, world

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        # consumers are (rank, worker) pairs: part = rank * nw + wid of world * nw parts
        for key, image, label in self.source.iterate(self.rank * nw + wid, self.world * nw):
            yield key, self.transform(image), label


def _collate(batch):
    keys, images, labels = zip(*batch)
    return torch.tensor(keys, dtype=torch.long), torch.stack(images), torch.tensor(labels, dtype=torch.long)


def shard_loader(source, transform: Callable, batch_size: int, workers: int = 0) -> DataLoader:
    """This rank's share of `source` as (keys, images, labels) batches: items rank, rank+W, ... (or shards)."""
    rank, world = world_info()
    if isinstance(source, WdsImages):
        ds = _WdsShard(source, transform, rank, world)
    else:
        ds = _MapShard(source, transform, list(range(rank, len(source), world)))
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate,
                      drop_last=False, persistent_workers=False)


def eval_autocast(device: torch.device, precision: str | None):
    """The autocast context evaluation runs under, by training.precision's rules, except that evaluation is fp32
    off CUDA, and bf16 is bf16 autocast: a model loaded for evaluation keeps fp32 weights (a bf16 student's are
    bf16 already, which autocast leaves as they are)."""
    if device.type != "cuda" or precision is None:
        precision = "fp32"
    elif precision == "bf16":
        precision = "amp_bf16"
    return autocast_for(precision, device)()


@torch.no_grad()
def encode_image_batches(model, loader: DataLoader, device: torch.device, precision: str | None = None,
                         desc: str = "encode images") -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(keys, L2-normalised float32 image features, labels) per batch of this rank's shard, on `device`."""
    dtype = module_input_dtype(model)
    for keys, images, labels in iterate(loader, desc=desc, enabled=world_info()[0] == 0):
        with eval_autocast(device, precision):
            feats = model.encode_image(images.to(device=device, dtype=dtype, non_blocking=True))
        yield keys.to(device), F.normalize(feats.float(), dim=-1), labels.to(device)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Rows of `t` from every rank, concatenated in rank order; ranks may hold different row counts."""
    _, world = world_info()
    if world == 1:
        return t
    counts = all_gather_cat(torch.tensor([t.shape[0]], device=t.device), with_grad=False).tolist()
    m = max(max(counts), 1)
    padded = torch.cat([t, t.new_zeros((m - t.shape[0], *t.shape[1:]))]) if t.shape[0] < m else t
    full = all_gather_cat(padded.contiguous(), with_grad=False)
    return torch.cat([full[i * m:i * m + c] for i, c in enumerate(counts)])


def gather_in_order(keys: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gather (keys, tensors...) from all ranks and sort every tensor by key: the 1-process dataset order."""
    keys = gather_rows(keys)
    order = torch.argsort(keys)
    return tuple(gather_rows(t)[order] for t in tensors)


@torch.no_grad()
def encode_images(model, source, transform: Callable, device: torch.device, batch_size: int = 64,
                  workers: int = 0, precision: str | None = None,
                  desc: str = "encode images") -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D], labels [N]) of the whole dataset in dataset order, on every rank."""
    keys, feats, labels = [], [], []
    for k, f, y in encode_image_batches(model, shard_loader(source, transform, batch_size, workers), device,
                                        precision, desc):
        keys.append(k)
        feats.append(f)
        labels.append(y)
    dim = feats[0].shape[1] if feats else _probe_dim(model, source, transform, device, precision)
    k = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.long, device=device)
    f = torch.cat(feats) if feats else torch.zeros(0, dim, device=device)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    return gather_in_order(k, f, y)


def _probe_dim(model, source, transform, device, precision) -> int:
    """Feature width for a rank whose shard is empty (it must still join the gathers with the right shape)."""
    image = source.load(0)[0] if hasattr(source, "load") else next(source.iterate(0, 1))[1]
    x = transform(image).unsqueeze(0).to(device=device, dtype=module_input_dtype(model))
    with torch.no_grad(), eval_autocast(device, precision):
        return int(model.encode_image(x).shape[-1])


@torch.no_grad()
def encode_texts(model, tokenizer: Callable, texts: list[str], device: torch.device, batch_size: int = 256,
                 precision: str | None = None) -> torch.Tensor:
    """L2-normalised text features [len(texts), D] in order, on every rank (each rank encodes a contiguous slice)."""
    rank, world = world_info()
    per = -(-len(texts) // world)
    mine = texts[rank * per:(rank + 1) * per]
    feats = []
    for i in range(0, len(mine), batch_size):
        tokens = tokenizer(mine[i:i + batch_size]).to(device)
        with eval_autocast(device, precision):
            feats.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    if not feats:
        with eval_autocast(device, precision):
            dim = model.encode_text(tokenizer(texts[:1]).to(device)).shape[-1]
        feats = [torch.zeros(0, dim, device=device)]
    return gather_rows(torch.cat(feats))

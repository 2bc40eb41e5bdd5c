"""Pieces of `--accum-freq K` (the step itself is `train.accumulated_step`).

Accumulation here keeps the losses of the WHOLE accumulated batch: the contrastive terms see K·B negatives per rank
and the KD terms (crd/icl/gd/afd: teacher similarity matrices over the batch) see the same K·B batch, exactly as a
batch of K·B would. Summing K micro-batch losses (open_clip without GradCache, CLIP-KD) would not. This is GradCache
(Gao et al., 2021): features of every micro-batch are computed without a graph, the losses are evaluated once on the
concatenation, and each micro-batch is re-run with a graph to backpropagate the cached feature gradients.

- `group_micro_batches(info, K)`: the loader yields lists of K micro-batches (one per optimizer step); num_batches and
  mid-epoch resume count optimizer steps.
- tree helpers over the student/teacher output dicts (tensors, lists of tensors, nested dicts).
- RNG state save/restore so the graph pass draws the same dropout as the cached pass (mfd masks are keyed by
  position in the global batch, so both passes mask alike anyway), and BatchNorm statistics counted once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .data import DataInfo
from .errors import UsageError

# ---- data ---------------------------------------------------------------------------------------------------------

class MicroBatches:
    """Re-iterable: groups K consecutive batches of `loader`; an incomplete last group is dropped."""

    def __init__(self, loader, k: int):
        self.loader, self.k = loader, k

    def __iter__(self) -> Iterator[list[dict]]:
        group: list[dict] = []
        for batch in self.loader:
            group.append(batch)
            if len(group) == self.k:
                yield group
                group = []

    def __len__(self) -> int:
        return len(self.loader) // self.k


def group_micro_batches(info: DataInfo, k: int) -> DataInfo:
    """A DataInfo over optimizer steps: each item is a list of K micro-batches of --batch-size samples."""
    if k == 1:
        return info
    if info.num_batches < k:
        raise UsageError(f"--accum-freq {k} needs at least {k} batches per epoch, the data gives {info.num_batches}")

    def set_epoch(epoch: int, start_step: int = 0) -> None:
        info.set_epoch(epoch, start_step * k)

    return DataInfo(dataloader=MicroBatches(info.dataloader, k), num_batches=info.num_batches // k,
                    num_samples=info.num_samples // info.num_batches * (info.num_batches // k) * k,
                    set_epoch_fn=set_epoch, extra={**info.extra, "accum_freq": k, "micro_batches": info},
                    stateful=info.stateful)


# ---- output trees -------------------------------------------------------------------------------------------------

def map_tensors(fn: Callable[[torch.Tensor], Any], tree):
    if isinstance(tree, dict):
        return {k: map_tensors(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_tensors(fn, v) for v in tree)
    return fn(tree) if torch.is_tensor(tree) else tree


def flatten(tree) -> list[torch.Tensor]:
    """Tensors of a tree in a fixed order (dict insertion order, list order)."""
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in flatten(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in flatten(v)]
    return [tree] if torch.is_tensor(tree) else []


def concat(trees: list):
    """Concatenate same-shaped trees along the batch dimension; 0-dim tensors (logit scales) are taken once."""
    first = trees[0]
    if first is None:
        return None
    if isinstance(first, dict):
        return {k: concat([t[k] for t in trees]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(concat(list(items)) for items in zip(*trees))
    if torch.is_tensor(first):
        return first if first.ndim == 0 else torch.cat(trees, dim=0)
    return first


def as_leaves(tree) -> tuple[Any, list[torch.Tensor]]:
    """Detached copies of the floating tensors of `tree` that require grad (the cached student outputs)."""
    leaves: list[torch.Tensor] = []

    def leaf(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        x = t.detach().requires_grad_(True)
        leaves.append(x)
        return x

    return map_tensors(leaf, tree), leaves


def surrogate(outputs, leaves: list[torch.Tensor], index: int, sizes: list[int], last: bool) -> torch.Tensor:
    """A scalar whose gradient w.r.t. the student equals the cached-output gradients pushed through micro-batch
    `index`'s outputs: sum over outputs of <output, dL/d(its rows of the concatenation)>.

    Per-sample outputs take their rows of the gradient; 0-dim outputs (the logit scale, identical in every micro-batch)
    take their whole gradient on the last micro-batch and zero elsewhere (so every parameter stays in every graph)."""
    start = sum(sizes[:index])
    total = None
    floating = [t for t in flatten(outputs) if t.is_floating_point()]
    if len(floating) != len(leaves):
        raise RuntimeError("the student returned a different set of outputs in the cached and the graph pass")
    for out, leaf in zip(floating, leaves):
        grad = leaf.grad
        if grad is None or (out.ndim == 0 and not last):
            term = out.sum() * 0.0
        elif out.ndim == 0:
            term = (out.float() * grad.float()).sum()
        else:
            term = (out.float() * grad[start:start + sizes[index]].float()).sum()
        total = term if total is None else total + term
    return total


# ---- RNG ----------------------------------------------------------------------------------------------------------

def rng_state(device: torch.device) -> tuple:
    return (torch.get_rng_state(),
            torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@contextlib.contextmanager
def frozen_norm_statistics(model: torch.nn.Module):
    """BatchNorm running statistics (and batch counts) as they were on entry: the graph pass of an accumulated step
    re-runs a micro-batch that the cached pass already counted, so its statistics update once, not twice. Normalisation
    itself still uses each micro-batch's own statistics (BN normalises per micro-batch, not over K·B)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and m.training and m.track_running_stats]
    saved = [{k: b.detach().clone() for k, b in m.named_buffers(recurse=False) if b is not None} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for k, value in buffers.items():
                    getattr(m, k).copy_(value)

"""Checkpoint RNG state: each rank saves and restores its own generators, so a resume is exact."""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state(device: torch.device | None = None) -> dict:
    """This process's RNG states as tensors and plain numbers only, so checkpoints load with weights_only=True.

    `cuda` is the generator of this process's own device: each rank saves and restores its own (checkpoints keep
    a list with one entry per rank)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                     cached), "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device is not None and device.type == "cuda" and torch.is_tensor(state.get("cuda")):
        torch.cuda.set_rng_state(state["cuda"], device)


def restore_rank_rng(saved, rank: int, world_size: int, device: torch.device | None = None) -> bool:
    """Restore this rank's own RNG states from a checkpoint's `rng` (a list with one entry per rank; checkpoints of
    older versions hold rank 0's only). False when the checkpoint has no state for this rank in this world size."""
    if isinstance(saved, dict):  # older checkpoints: rank 0's state alone
        if world_size != 1:
            return False
        saved = [saved]
    if len(saved) != world_size:
        return False
    set_rng_state(saved[rank], device)
    return True

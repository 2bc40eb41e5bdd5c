"""Checkpoints: atomic writes, a `latest.txt` pointer, and the RNG state needed for exact resume."""

from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch

from .params import UsageError

LATEST = "latest.txt"


def atomic_save(obj, path: str) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a crash never leaves a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_latest(checkpoint_dir: str, filename: str) -> None:
    tmp = os.path.join(checkpoint_dir, f".{LATEST}.tmp")
    with open(tmp, "w") as f:
        f.write(filename + "\n")
    os.replace(tmp, os.path.join(checkpoint_dir, LATEST))


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    pointer = os.path.join(checkpoint_dir, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            path = os.path.join(checkpoint_dir, f.read().strip())
        if os.path.isfile(path):
            return path
    return None


def rng_state() -> dict:
    """RNG states as tensors and plain numbers only, so checkpoints load with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                     cached), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str) -> dict:
    """A training checkpoint, loaded weights_only=True like every file the project reads."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint to resume not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0] if str(exc) else exc}") from exc

"""Checkpoints: atomic writes, a `latest.txt` pointer, and the RNG state needed for exact resume."""

from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch

from .errors import UsageError

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


# What a resume may not change, and why (the global batch, per-process batch x processes x --accum-freq, and the
# epoch length are checked apart).
_DATA_MOVES = "the data position would no longer match"
_OPTIMIZER_DIFFERS = "the saved optimizer state is for other parameters"
_FIXED_ON_RESUME = {"dataset_type": ("--dataset-type", _DATA_MOVES), "seed": ("--seed", _DATA_MOVES),
                    "train_num_samples": ("--train-num-samples", _DATA_MOVES),
                    "lock_image": ("--lock-image", _OPTIMIZER_DIFFERS),
                    "lock_image_unlocked_groups": ("--lock-image-unlocked-groups", _OPTIMIZER_DIFFERS),
                    "lock_text": ("--lock-text", _OPTIMIZER_DIFFERS),
                    "lock_text_unlocked_layers": ("--lock-text-unlocked-layers", _OPTIMIZER_DIFFERS),
                    "model": ("--model", "the checkpoint holds another architecture")}
# What it may change, said out loud: the run goes on from the same data position, but not as it would have.
_NOTED_ON_RESUME = {"epochs": "--epochs (the LR schedule now spans the new total)", "lr": "--lr", "warmup": "--warmup",
                    "lr_scheduler": "--lr-scheduler", "wd": "--wd", "distill": "--distill", "recipe": "--recipe",
                    "data_root": "--data-root", "train_data": "--train-data (the same file names in a new place)"}


def global_batch(batch_size: int, world_size: int, accum_freq: int) -> int:
    return batch_size * world_size * accum_freq


def _file_names(sources: str | None) -> list[str] | None:
    return [os.path.basename(x.rstrip("/")) for x in sources.split(",")] if sources else None


def check_resume(saved: dict, args, world_size: int, num_batches: int) -> list[str]:
    """Refuse (UsageError) a resume whose flags break exact resume; return the notes for changes that do not.

    `saved` is the checkpoint; its `args` and `world_size` describe the run that wrote it."""
    old = saved.get("args") or {}
    if not old:
        return ["the checkpoint records no flags: cannot check that this run continues it"]
    notes: list[str] = []
    old_world = saved.get("world_size")
    old_accum = old.get("accum_freq", 1)
    if old_world is not None:
        before = global_batch(old["batch_size"], old_world, old_accum)
        now = global_batch(args.batch_size, world_size, args.accum_freq)
        if before != now:
            raise UsageError(f"cannot resume: the checkpoint's global batch is {before} ({old_world} processes x "
                             f"--batch-size {old['batch_size']} x --accum-freq {old_accum}), this run's is {now} "
                             f"({world_size} x {args.batch_size} x {args.accum_freq}); the data position and the LR "
                             "schedule would shift. Keep the global batch, or start a new run from the weights with "
                             "--pretrained CHECKPOINT")
        if old_world != world_size:
            notes.append(f"resuming on {world_size} processes instead of {old_world} at the same global batch: data "
                         "order and patch masks are unchanged, the per-rank random streams (dropout) restart from "
                         "the seed")
        elif old_accum != args.accum_freq:
            notes.append(f"--accum-freq {args.accum_freq} instead of {old_accum} at the same global batch")
    if "train_data" in old and _file_names(old["train_data"]) != _file_names(args.train_data):
        raise UsageError(f"cannot resume: --train-data was {old['train_data']!r} in the checkpoint and is "
                         f"{args.train_data!r} now; the data position would no longer match. Resume with the same "
                         "data, or start a new run with --pretrained CHECKPOINT")
    for key, (flag, why) in _FIXED_ON_RESUME.items():
        if key in old and old[key] != getattr(args, key, None):
            raise UsageError(f"cannot resume: {flag} was {old[key]!r} in the checkpoint and is "
                             f"{getattr(args, key, None)!r} now; {why}. Resume with the same value, or start a new "
                             "run with --pretrained CHECKPOINT")
    saved_batches = old.get("_num_batches")
    if saved_batches is not None and saved_batches != num_batches:
        raise UsageError(f"cannot resume: an epoch had {saved_batches} steps in the checkpoint's run and has "
                         f"{num_batches} now (the data changed size); start a new run with --pretrained CHECKPOINT")
    for key, flag in _NOTED_ON_RESUME.items():
        if key in old and old[key] != getattr(args, key, None):
            notes.append(f"{flag} changed from {old[key]!r} to {getattr(args, key, None)!r}")
    return notes


def load_checkpoint(path: str) -> dict:
    """A training checkpoint, loaded weights_only=True like every file the project reads."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint to resume not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0] if str(exc) else exc}") from exc

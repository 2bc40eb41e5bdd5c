"""What a resume may change: refused with one line when exact resume would break, said out loud otherwise."""

from __future__ import annotations

import os

from ..errors import UsageError

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
                    "opt": ("--opt", _OPTIMIZER_DIFFERS),
                    "model": ("--model", "the checkpoint holds another architecture")}
# What it may change, said out loud: the run goes on from the same data position, but not as it would have.
_NOTED_ON_RESUME = {"epochs": "--epochs (the LR schedule now spans the new total)", "lr": "--lr", "warmup": "--warmup",
                    "lr_scheduler": "--lr-scheduler", "wd": "--wd", "distill": "--distill", "recipe": "--recipe",
                    "data_root": "--data-root", "decode_device": "--decode-device (the same views; pixels "
                    "resampled by another kernel)", "train_data": "--train-data (the same file names in a new place)"}


def global_batch(batch_size: int, world_size: int, accum_freq: int) -> int:
    return batch_size * world_size * accum_freq


def _file_names(sources: str | None) -> list[str] | None:
    return [os.path.basename(x.rstrip("/")) for x in sources.split(",")] if sources else None


def check_resume(saved: dict, current: dict, world_size: int, num_batches: int) -> list[str]:
    """Refuse (UsageError) a resume whose flags break exact resume; return the notes for changes that do not.

    `saved` is the checkpoint: its `args` (the flat {flag dest: value} record of its config) and `world_size`
    describe the run that wrote it; `current` is this run's record (`Config.flat()`)."""
    old = saved.get("args") or {}
    batch, accum, train_data = current["batch_size"], current["accum_freq"], current["train_data"]
    if not old:
        return ["the checkpoint records no flags: cannot check that this run continues it"]
    notes: list[str] = []
    old_world = saved.get("world_size")
    old_accum = old.get("accum_freq", 1)
    if old_world is not None:
        before = global_batch(old["batch_size"], old_world, old_accum)
        now = global_batch(batch, world_size, accum)
        if before != now:
            raise UsageError(f"cannot resume: the checkpoint's global batch is {before} ({old_world} processes x "
                             f"--batch-size {old['batch_size']} x --accum-freq {old_accum}), this run's is {now} "
                             f"({world_size} x {batch} x {accum}); the data position and the LR schedule would "
                             "shift. Keep the global batch, or start a new run from the weights with --pretrained "
                             "CHECKPOINT")
        if old_world != world_size:
            notes.append(f"resuming on {world_size} processes instead of {old_world} at the same global batch: data "
                         "order and patch masks are unchanged, the per-rank random streams (dropout) restart from "
                         "the seed")
        elif old_accum != accum:
            notes.append(f"--accum-freq {accum} instead of {old_accum} at the same global batch")
    if "train_data" in old and _file_names(old["train_data"]) != _file_names(train_data):
        raise UsageError(f"cannot resume: --train-data was {old['train_data']!r} in the checkpoint and is "
                         f"{train_data!r} now; the data position would no longer match. Resume with the "
                         "same data, or start a new run with --pretrained CHECKPOINT")
    for key, (flag, why) in _FIXED_ON_RESUME.items():
        if key in old and old[key] != current.get(key):
            raise UsageError(f"cannot resume: {flag} was {old[key]!r} in the checkpoint and is "
                             f"{current.get(key)!r} now; {why}. Resume with the same value, or start a new "
                             "run with --pretrained CHECKPOINT")
    saved_batches = saved.get("num_batches", old.get("_num_batches"))  # older checkpoints kept it in args
    if saved_batches is not None and saved_batches != num_batches:
        raise UsageError(f"cannot resume: an epoch had {saved_batches} steps in the checkpoint's run and has "
                         f"{num_batches} now (the data changed size); start a new run with --pretrained CHECKPOINT")
    for key, flag in _NOTED_ON_RESUME.items():
        if key in old and old[key] != current.get(key):
            notes.append(f"{flag} changed from {old[key]!r} to {current.get(key)!r}")
    return notes

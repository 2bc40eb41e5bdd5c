"""Checkpoints: the manager over a run's stateful parts, per-rank RNG state, and the resume checks."""

from .manager import LATEST, CheckpointManager, Stateful, latest_checkpoint, load_checkpoint
from .resume import check_resume, global_batch
from .rng import restore_rank_rng, rng_state, set_rng_state

__all__ = ["LATEST", "CheckpointManager", "Stateful", "check_resume", "global_batch", "latest_checkpoint",
           "load_checkpoint", "restore_rank_rng", "rng_state", "set_rng_state"]

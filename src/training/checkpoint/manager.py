"""The checkpoint manager: saves and restores a run's stateful parts, owns the file names, `latest.txt`, the save
cadence, `--keep-last-k` (`--delete-previous-checkpoint` is K = 1), `--save-most-recent` (`epoch_latest.pt`), and the
checks of what a resume may change.

One file holds the whole run (rank 0 writes it, atomically):
    model, optimizer           the engine's part: full (unsharded) student weights and canonical optimizer state
    loss, scaler               the loss-side parameters and the GradScaler (None without loss scaling)
    epoch, step, batch_in_epoch, nonfinite_total, skipped      the train state (skipped: summed over ranks)
    rng                        one entry per rank: each rank's own generators
    data_state                 one entry per rank when the loader has a position of its own (WebDataset)
    world_size, num_batches, args   the run that wrote it (args: the flat config record)
Every file is loaded with weights_only=True.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Protocol

import torch

from .. import distributed
from ..config import CheckpointConfig
from ..errors import UsageError, first_line
from ..fileio import torch_save, write_text
from .resume import check_resume
from .rng import restore_rank_rng, rng_state

LATEST = "latest.txt"
MOST_RECENT = "epoch_latest.pt"  # open_clip's --save-most-recent file: the newest state under a fixed name
_CHECKPOINT_NAME = re.compile(r"(epoch|step)_\d+\.pt")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def load_checkpoint(path: str) -> dict:
    """A training checkpoint, loaded weights_only=True like every file the project reads."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint to resume not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"cannot read checkpoint {path}: {first_line(exc)}") from exc


def latest_checkpoint(folder: str) -> str | None:
    pointer = os.path.join(folder, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            path = os.path.join(folder, f.read().strip())
        if os.path.isfile(path):
            return path
    return None


class CheckpointManager:
    """Over the parts `engine` (model + optimizer), `loss`, `scaler` (or None), `train` (the train state) and
    `data` (the loader). `folder` None: nothing is written (--logs '')."""

    def __init__(self, config: CheckpointConfig, folder: str | None, env: distributed.DistEnv, *, engine: Stateful,
                 loss: Stateful, scaler: Stateful | None, train: Stateful, data: Stateful, record: dict,
                 num_batches: int, epochs: int):
        self.config, self.folder, self.env = config, folder, env
        self.engine, self.loss, self.scaler, self.train, self.data = engine, loss, scaler, train, data
        self.record, self.num_batches, self.epochs = record, num_batches, epochs

    # ---- the file's content (collective: every rank builds it; FSDP/ZeRO gather full tensors) ------------------
    def state_dict(self) -> dict:
        state = {**self.engine.state_dict(), "loss": self.loss.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                 **self.train.state_dict(), "world_size": self.env.world_size, "num_batches": self.num_batches,
                 "rng": distributed.gather_objects(rng_state(self.env.device)), "args": self.record}
        data_state = distributed.gather_objects(self.data.state_dict())
        if any(s is not None for s in data_state):
            state["data_state"] = data_state
        return state

    def load_state_dict(self, state: dict) -> None:
        self.engine.load_state_dict(state)
        self.loss.load_state_dict(state["loss"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.train.load_state_dict(state)
        if not restore_rank_rng(state["rng"], self.env.rank, self.env.world_size, self.env.device):
            logging.warning("resume: the checkpoint has no random state for rank %d of %d: reseeded from the seed",
                            self.env.rank, self.env.world_size)
        if state.get("data_state") is not None:
            self.data.load_state_dict(state["data_state"])

    # ---- cadence -------------------------------------------------------------------------------------------------
    def due(self, *, step: int, epoch: int, epoch_done: bool, finished: bool = False, preempted: bool = False
            ) -> str | None:
        """The file to write after this step, or None. A stop request always writes step_N.pt (what the sbatch
        trap's requeue resumes). An epoch end writes epoch_N.pt every --save-frequency epochs, at the last epoch
        (resume, export) and when --max-steps ends the run there; mid-epoch, step_N.pt every --save-every-n-steps
        steps and when --max-steps is reached."""
        if preempted:
            return f"step_{step}.pt"
        if epoch_done:
            periodic = self.config.save_frequency > 0 and epoch % self.config.save_frequency == 0
            return f"epoch_{epoch}.pt" if periodic or epoch == self.epochs or finished else None
        every = self.config.save_every_n_steps
        return f"step_{step}.pt" if finished or (every and step % every == 0) else None

    def save(self, filename: str) -> None:
        """Collective. Rank 0 writes the file atomically, points `latest.txt` at it, with --save-most-recent also
        writes it as epoch_latest.pt (never pruned), and prunes to --keep-last-k."""
        if self.folder is None:
            return
        state = self.state_dict()
        if self.env.is_master:
            torch_save(state, os.path.join(self.folder, filename))
            if self.config.save_most_recent:
                torch_save(state, os.path.join(self.folder, MOST_RECENT))
            write_text(os.path.join(self.folder, LATEST), filename + "\n")
            logging.info("saved %s", os.path.join(self.folder, filename))
            self._prune(keep=filename)
        distributed.barrier()

    def _prune(self, keep: str) -> None:
        k = self.config.keep_last_k
        if not k:
            return
        names = [n for n in os.listdir(self.folder) if _CHECKPOINT_NAME.fullmatch(n)]
        names.sort(key=lambda n: os.stat(os.path.join(self.folder, n)).st_mtime_ns)
        for name in names[:-k]:
            if name != keep:
                os.remove(os.path.join(self.folder, name))
                logging.info("removed %s (--keep-last-k %d%s)", name, k,
                             ", --delete-previous-checkpoint" if self.config.delete_previous_checkpoint else "")

    # ---- resume --------------------------------------------------------------------------------------------------
    def resume(self) -> bool:
        """--resume latest|PATH: check the checkpoint against this run, restore every part. False: nothing to do."""
        path = self.config.resume
        if path == "latest":
            path = latest_checkpoint(self.folder) if self.folder else None
            if path is None:
                logging.info("--resume latest: no checkpoint in %s yet, starting fresh", self.folder)
                return False
        if not path:
            return False
        state = load_checkpoint(path)
        for note in check_resume(state, self.record, self.env.world_size, self.num_batches):
            logging.warning("resume: %s", note)
        self.load_state_dict(state)
        logging.info("resumed from %s at epoch %d, step %d, batch %d", path, state["epoch"], state["step"],
                     state["batch_in_epoch"])
        return True

"""Metrics to stdout (rank 0), TensorBoard and wandb (`--report-to wandb`: the optional extra `wandb`)."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, field

from .errors import UsageError


class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time of each record, not the stream it was created with (a caller that
    swaps and closes sys.stdout, as pytest's capture does, would otherwise leave logging writing to a closed file)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(log_file: str | None, is_master: bool, level=logging.INFO) -> None:
    handlers: list[logging.Handler] = [_CurrentStdout()]
    if log_file and is_master:
        try:
            os.makedirs(os.path.dirname(log_file), exist_ok=True)
            handlers.append(logging.FileHandler(log_file))
        except OSError as exc:
            raise UsageError(f"cannot write the run folder {os.path.dirname(log_file)} (--logs): "
                             f"{exc.strerror or exc}") from exc
    logging.basicConfig(level=level if is_master else logging.WARNING, handlers=handlers, force=True,
                        format="%(asctime)s | %(levelname)s | %(message)s", datefmt="%Y-%m-%d %H:%M:%S")


def check_wandb() -> None:
    """--report-to wandb needs the wandb package: one line at start-up, not a traceback at the first log."""
    if "wandb" not in sys.modules and importlib.util.find_spec("wandb") is None:
        raise UsageError("--report-to wandb needs the wandb package: pip install -e '.[wandb]' (or pip install wandb)")


@dataclass
class WandbRun:
    """What open_clip_train gives wandb.init: project, run name, notes and the run's flags."""

    project: str
    name: str | None
    notes: str = ""
    config: dict = field(default_factory=dict)
    dir: str | None = None


class MetricLogger:
    """One line per log step on stdout, every scalar to TensorBoard and wandb when enabled (rank 0 only)."""

    def __init__(self, tensorboard_dir: str | None, enabled: bool, wandb: WandbRun | None = None):
        self.enabled = enabled
        self.writer = self.wandb = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir)
        if enabled and wandb is not None:
            check_wandb()
            module = importlib.import_module("wandb")
            if wandb.dir:
                os.makedirs(wandb.dir, exist_ok=True)
            module.init(project=wandb.project, name=wandb.name, notes=wandb.notes, tags=[], config=wandb.config,
                        dir=wandb.dir)
            self.wandb = module

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        text = " ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in metrics.items())
        logging.info("%s step %d | %s", prefix, step, text)
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)
            self.writer.flush()
        if self.wandb is not None:
            scalars = {f"{prefix}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
            self.wandb.log({**scalars, "step": step}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

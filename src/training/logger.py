"""Metrics to stdout (rank 0) and TensorBoard."""

from __future__ import annotations

import logging
import os
import sys

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


class MetricLogger:
    """One line per log step on stdout, every scalar to TensorBoard when enabled (rank 0 only)."""

    def __init__(self, tensorboard_dir: str | None, enabled: bool):
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir)

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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

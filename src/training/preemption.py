"""Stop cleanly when asked: SIGUSR1 or SIGTERM to a training process, or a stop file in the run folder.

SLURM's `--signal=B:USR1@300` reaches only the batch shell, and torchrun's agent dies on a USR1 of its own, so the
sbatch scripts' trap touches `<logs>/<name>/stop` instead (a file every node sees); a signal sent straight to the
trainer (`kill -USR1 PID`, a SIGTERM from the scheduler or from torchrun) works too. The trainer then finishes the
current step, writes `step_K.pt`, and exits; `--resume latest` continues from there exactly.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    def __init__(self, stop_file: str | None = None, device: torch.device | None = None, is_master: bool = True):
        self.stop_file, self.device, self.is_master = stop_file, device or torch.device("cpu"), is_master
        self.reason: str | None = None  # what asked this process to stop
        self.agreed_reason: str | None = None  # set once every rank has agreed to stop
        self._previous: dict = {}
        if stop_file and is_master and os.path.exists(stop_file):
            os.remove(stop_file)  # left by the job that was stopped: this run must not stop at once
            logging.info("removed the stop file of the previous run: %s", stop_file)

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        self.reason = signal.Signals(signum).name

    def should_stop(self) -> bool:
        """True on every rank as soon as any rank was asked to stop (a collective: call it on every rank)."""
        if self.reason is None and self.stop_file and self.is_master and os.path.exists(self.stop_file):
            self.reason = f"stop file {self.stop_file}"
        asked = self.reason is not None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([1.0 if asked else 0.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            asked = bool(flag.item())
        if asked and self.agreed_reason is None:
            self.agreed_reason = self.reason or "another rank was asked to stop"
        return asked

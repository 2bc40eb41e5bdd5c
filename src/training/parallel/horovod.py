"""Horovod (open_clip's --horovod): `launch` before the process group exists, then the engine."""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import UsageError
from .ddp import compile_blocks
from .optim_state import SideOptimizerEngine


def import_horovod():
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        raise UsageError(f"--horovod needs horovod built with PyTorch support (pip install horovod; "
                         f"docs/scale_out.md): {exc}") from exc
    return hvd


def launch() -> None:
    """Before the process group exists: hvd.init() tells each process its rank."""
    hvd = import_horovod()
    hvd.init()
    os.environ.setdefault("RANK", str(hvd.rank()))
    os.environ.setdefault("WORLD_SIZE", str(hvd.size()))
    os.environ.setdefault("LOCAL_RANK", str(hvd.local_rank()))
    if hvd.size() > 1 and ("MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ):
        raise UsageError("--horovod: export MASTER_ADDR and MASTER_PORT too (the distillation loss all-gathers "
                         "features through torch.distributed; see slurm/vit_t_kd.sh)")


class HorovodEngine(SideOptimizerEngine):
    """Horovod's DistributedOptimizer averages the student's gradients (open_clip's --horovod); the distillation
    loss still all-gathers features through torch.distributed (initialised from Horovod's ranks, see `launch`)."""

    name = "horovod"

    def _wrap(self, model: nn.Module) -> nn.Module:
        self.hvd = import_horovod()
        if self.torchcompile:
            compile_blocks(model)
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        return model

    def _student_optimizer(self, optimizer):
        return self.hvd.DistributedOptimizer(optimizer, named_parameters=self.unwrapped.named_parameters(),
                                             backward_passes_per_step=self.accum_freq)

    def zero_grad(self) -> None:
        self.student_optimizer.zero_grad()  # Horovod's takes no set_to_none (it sets gradients to None)
        if self.side_optimizer is not None:
            self.side_optimizer.zero_grad(set_to_none=True)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        self.student_optimizer.synchronize()
        self._synchronized = True
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm)

    _synchronized = False  # clip_grad_norm_ already averaged the student's gradients

    def step(self) -> None:
        if self._synchronized:
            with self.student_optimizer.skip_synchronize():
                self.student_optimizer.step()
            self._synchronized = False
        else:
            self.student_optimizer.step()
        if self.side_optimizer is not None:
            self.side_optimizer.step()

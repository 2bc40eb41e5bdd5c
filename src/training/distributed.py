"""Process-group set-up and the few collectives the project needs.

Detects torchrun (RANK/WORLD_SIZE/LOCAL_RANK) and SLURM (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID);
with neither, the run is a single process and no process group is created. Backend: nccl on CUDA, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UsageError


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int | None = None) -> int | None:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def detect_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun or SLURM variables; (0, 0, 1) otherwise."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # torchrun, or srun with exported vars
        return _env_int("RANK"), _env_int("LOCAL_RANK", default=0), _env_int("WORLD_SIZE")
    if "SLURM_NTASKS" in os.environ and "SLURM_PROCID" in os.environ:  # srun, one task per GPU
        return _env_int("SLURM_PROCID"), _env_int("SLURM_LOCALID", default=0), _env_int("SLURM_NTASKS")
    return 0, 0, 1


def resolve_device(requested: str | None, local_rank: int) -> torch.device:
    if requested in (None, "", "auto"):
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was requested but CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def init_distributed(device: str | None = None, dist_backend: str | None = None, dist_url: str = "env://",
                     timeout_minutes: int = 30) -> DistEnv:
    rank, local_rank, world_size = detect_world()
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = dist_backend or ("nccl" if dev.type == "cuda" else "gloo")
        if "MASTER_ADDR" not in os.environ and "SLURM_JOB_NODELIST" in os.environ:
            raise ValueError("SLURM launch without MASTER_ADDR/MASTER_PORT: export them in the sbatch script "
                             "(see slurm/vit_t_kd.sh)")
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        dist.init_process_group(backend=backend, init_method=dist_url, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def world_info() -> tuple[int, int]:
    """(rank, world_size) of the current default group, (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_master() -> bool:
    return world_info()[0] == 0


def barrier() -> None:
    if world_info()[1] > 1:
        dist.barrier()


def all_gather_cat(tensor: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0 (rank order).

    with_grad=True keeps the autograd graph through every rank's slice (torch.distributed.nn), so a loss over the
    gathered batch sends gradient back to the rank that produced each row. with_grad=False returns the other ranks'
    rows detached but keeps this rank's own slice in the graph (open_clip's gather_with_grad=False semantics).
    """
    rank, world_size = world_info()
    if world_size == 1:
        return tensor
    if with_grad:
        return _AllGatherWithGrad.apply(tensor)
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.detach().contiguous())
    parts[rank] = tensor
    return torch.cat(parts, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's rows (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        rank, world_size = world_info()
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_reduce_mean_(tensors) -> None:
    """In-place average of tensors across ranks (used for loss-side parameter gradients)."""
    _, world_size = world_info()
    if world_size == 1:
        return
    for t in tensors:
        if t is not None:
            dist.all_reduce(t)
            t.div_(world_size)


def broadcast_module_(module: torch.nn.Module, src: int = 0) -> None:
    """Make parameters and buffers identical on every rank (rank `src` wins)."""
    if world_info()[1] == 1:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src)


def reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if world_info()[1] > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order (collective: every rank must call it)."""
    world_size = world_info()[1]
    if world_size == 1:
        return [obj]
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def sum_counters(counts: dict[str, int]) -> dict[str, int]:
    """Sum string-keyed counters over ranks (collective: every rank must call it)."""
    total: dict[str, int] = {}
    for part in gather_objects(dict(counts)):
        for k, v in part.items():
            total[k] = total.get(k, 0) + v
    return total


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

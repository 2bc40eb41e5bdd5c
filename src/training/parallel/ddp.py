"""The base `Engine`: one plain process or DDP, the reference behaviour every other engine reproduces."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from .. import distributed
from ..errors import UsageError
from ..precision import Precision

LOGIT_SCALE_MAX = math.log(100)

MakeGroups = Callable[[], list[dict]]
MakeOptimizer = Callable[[list[dict]], torch.optim.Optimizer]


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of open_clip and timm towers (transformer blocks, timm stages/blocks, ResNet bottlenecks):
    the units FSDP2 shards (gathered one at a time) and --torchcompile compiles."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import ResidualAttentionBlock

    found: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, ResidualAttentionBlock):
            found.append(m)
        elif isinstance(m, (TimmModel, ModifiedResNet)):
            trunk = m.trunk if isinstance(m, TimmModel) else m
            for attr in ("blocks", "stages", "layers", "layer1", "layer2", "layer3", "layer4"):
                container = getattr(trunk, attr, None)
                if isinstance(container, (nn.Sequential, nn.ModuleList)):
                    found.extend(child for child in container if any(True for _ in child.parameters()))
    return found


def compile_blocks(model: nn.Module) -> None:
    """--torchcompile: each block compiled on its own (the engines shard or wrap around them)."""
    for block in blocks(model):
        block.compile()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def ensure_process_group(env: distributed.DistEnv) -> None:
    """FSDP2 and DeepSpeed need a process group even for one process (torchrun-less single-rank runs)."""
    if not dist.is_initialized():
        backend = "nccl" if env.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def flat_params(groups: list[dict]) -> list[nn.Parameter]:
    return [p for g in groups for p in g["params"]]


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """--use-bn-sync: every BatchNorm of the student becomes SyncBatchNorm (batch statistics over all ranks), as
    open_clip_train does under DDP. Frozen BatchNorms (--lock-image-freeze-bn-stats) stay frozen. torch's
    SyncBatchNorm runs on CUDA only, so a CPU run is refused."""
    if device.type != "cuda":
        raise UsageError("--use-bn-sync: torch's SyncBatchNorm runs on CUDA only (this run is on "
                         f"{device.type}); drop the flag")
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    n = sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    logging.info("--use-bn-sync: %d BatchNorm layer(s) of the student synchronise their statistics", n)
    return converted


class Engine:
    """Single process or DDP. Built by `training.parallel.create_engine`; the subclasses override the hooks below.

    `make_groups()` returns the canonical parameter groups (called after wrapping: FSDP2 replaces the parameters);
    `make_optimizer(groups)` builds the torch optimizer.
    """

    name = "ddp"

    def __init__(self, env: distributed.DistEnv, *, model: nn.Module, loss_fn: nn.Module, make_groups: MakeGroups,
                 make_optimizer: MakeOptimizer, scaler: torch.amp.GradScaler | None, precision: Precision,
                 batch_size: int, accum_freq: int = 1, grad_clip_norm: float | None = None,
                 torchcompile: bool = False, sync_bn: bool = False, static_graph: bool = False):
        self.env, self.loss_fn, self.scaler, self.precision = env, loss_fn, scaler, precision
        self.batch_size, self.accum_freq, self.grad_clip_norm = batch_size, accum_freq, grad_clip_norm
        self.torchcompile, self.sync_bn, self.static_graph = torchcompile, sync_bn, static_graph
        self.unwrapped = model  # the StudentModel (unwrapped)
        self.student = model.clip  # the bare open_clip model (what checkpoints and exports hold)
        self.model = self._wrap(model)
        self.groups = make_groups()  # canonical parameter groups: param_groups(student, loss_fn) after wrapping
        self.params = flat_params(self.groups)
        self.optimizer = self._make_optimizer(make_optimizer)

    # -- construction (overridden by the other engines)
    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.torchcompile:
            compile_blocks(model)
        if self.env.distributed:
            from torch.nn.parallel import DistributedDataParallel

            dev = self.env.device
            if self.sync_bn:
                model = sync_batchnorm(model, dev)
            # gradients as views of DDP's all-reduce buckets: one copy of the gradients instead of two
            return DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None,
                                           gradient_as_bucket_view=True, static_graph=self.static_graph)
        return model

    def _make_optimizer(self, make_optimizer: MakeOptimizer):
        return make_optimizer(self.groups)

    # -- the step
    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def micro_batch(self, last: bool):
        """One backward of an accumulated step: DDP all-reduces only on the last one."""
        if not last and isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss times the fp16 loss scale (amp on CUDA), unchanged otherwise."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def backward(self, loss: torch.Tensor, prescaled: bool = False) -> None:
        """Backprop through the student. prescaled: `loss` already carries the loss scale (accumulated steps)."""
        (loss if prescaled else self.scale_loss(loss)).backward()

    def update(self) -> None:
        """After the backward: average the gradients the wrapper does not sync, clip (--grad-clip-norm), step."""
        distributed.all_reduce_mean_([p.grad for p in self.unsynced_params()])
        if self.grad_clip_norm is not None:
            self.clip_grad_norm_(self.grad_clip_norm)
        self.step()

    def unsynced_params(self) -> list[nn.Parameter]:
        """Outside the wrapper's gradient sync: the loss-side heads (and, under FSDP2, the replicated scalars)."""
        return [p for p in self.loss_fn.parameters() if p.requires_grad]

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        self._unscale()
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm)

    def _unscale(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)

    def step(self) -> None:
        """The optimizer step on gradients already synced and clipped (`update`), and the loss scale's update."""
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def clamp_logit_scale_(self) -> None:
        with torch.no_grad():
            self.student.logit_scale.clamp_(0, LOGIT_SCALE_MAX)

    def full_grads(self) -> dict[str, torch.Tensor]:
        return {n: full_tensor(p.grad) for n, p in self.student.named_parameters() if p.grad is not None}

    # -- checkpoints
    def state_dict(self) -> dict:
        """The checkpoint's `model` and `optimizer` entries (collective; complete on rank 0)."""
        return {"model": self.model_state_dict(), "optimizer": self.optimizer_state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.load_model_state_dict(state["model"])
        self.load_optimizer_state_dict(state["optimizer"])

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return self.student.state_dict()

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.student.load_state_dict(state)

    def optimizer_state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def unsharded(self):
        return contextlib.nullcontext()

    def describe(self) -> str:
        return f"{self.name} over {self.env.world_size} process(es)"

"""How the student is wrapped and stepped: DDP (default, `ddp`), FSDP2 (`fsdp`), DeepSpeed ZeRO (`deepspeed`), Horovod
(`horovod`); the canonical optimizer state they all save is in `optim_state`.

`create_engine(...)` returns an `Engine`; the training step (train.py) and checkpoints only talk to this interface:

    engine.model(image, text)          the wrapped StudentModel's forward
    engine.zero_grad()
    engine.micro_batch(last)           context for one backward of an accumulated step (gradient sync on the last)
    engine.backward(loss)                 (engine.scale_loss(loss) for fp16 loss scaling)
    engine.update()                    all of the gradient sync the wrapper leaves (the loss-side heads, FSDP's scalar
                                       logit scale), unscaling, clipping at grad_clip_norm, the optimizer step
                                       (`engine.step()`) and the loss scale's update
    engine.clamp_logit_scale_()        open_clip's clamp of the student temperature (on the master weights)
    engine.state_dict()                {"model": the bare student's plain state_dict, "optimizer": canonical format}
    engine.load_state_dict(state)        (collective; complete on rank 0; also per part: model_/optimizer_state_dict)
    engine.unsharded()                 context in which the bare student can be called directly (evaluation)
    engine.full_grads()                {name: full gradient} between backward and step (tests, debugging)

Checkpoint format, whatever the engine: `model` is the bare open_clip student state_dict, and `optimizer` is what
`torch.optim.AdamW(param_groups(student, loss_fn)).state_dict()` holds in a plain single-process run, so a checkpoint
moves between engines. Heavy dependencies (deepspeed, horovod) are imported only when their engine is chosen.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..config import ParallelConfig
from ..errors import UsageError
from ..precision import Precision
from .ddp import Engine, MakeGroups, MakeOptimizer, blocks
from .deepspeed import DeepSpeedEngine, deepspeed_config
from .fsdp import FSDPEngine, fsdp_mixed_precision
from .horovod import HorovodEngine

__all__ = ["ENGINES", "DeepSpeedEngine", "Engine", "FSDPEngine", "HorovodEngine", "blocks", "check_config",
           "create_engine", "deepspeed_config", "fsdp_mixed_precision", "launch"]

ENGINES: dict[str, type[Engine]] = {"ddp": Engine, "fsdp": FSDPEngine, "deepspeed": DeepSpeedEngine,
                                    "horovod": HorovodEngine}


def check_config(parallel: ParallelConfig) -> None:
    """The start-up checks of the scale-out flags that argparse cannot make."""
    _ = parallel.engine  # refuses more than one engine
    for flag, on in (("--use-bn-sync", parallel.use_bn_sync), ("--ddp-static-graph", parallel.ddp_static_graph)):
        if on and parallel.engine != "ddp":
            raise UsageError(f"{flag} applies to DDP, not --{parallel.engine}")
    if parallel.deepspeed and not os.path.isfile(parallel.deepspeed):
        raise UsageError(f"--deepspeed config not found: {parallel.deepspeed}")


def launch(parallel: ParallelConfig) -> None:
    """Before the process group exists: Horovod needs hvd.init() to tell each process its rank."""
    check_config(parallel)
    if parallel.engine == "horovod":
        from .horovod import launch as launch_horovod

        launch_horovod()


def create_engine(parallel: ParallelConfig, env: distributed.DistEnv, *, model: nn.Module, loss_fn: nn.Module,
                  teacher: Any, make_groups: MakeGroups, make_optimizer: MakeOptimizer,
                  scaler: torch.amp.GradScaler | None, precision: Precision, batch_size: int, accum_freq: int = 1,
                  grad_clip_norm: float | None = None, torchcompile: bool = False) -> Engine:
    """Wrap the StudentModel `model` with the engine `parallel` chooses and build its optimizer.

    `make_groups()` returns the canonical parameter groups (called after wrapping: FSDP2 replaces the parameters);
    `make_optimizer(groups)` builds the torch optimizer. batch_size is per process and per micro-batch.
    """
    check_config(parallel)
    name = parallel.engine
    if scaler is not None and name in ("deepspeed", "horovod"):  # --precision amp on CUDA: fp16 with a GradScaler
        raise UsageError(f"--{name} runs with --precision amp_bf16, bf16 or fp32: fp16 loss scaling is not wired "
                         "through its optimizer (DeepSpeed's scaler would also scale the loss-side heads)")
    common = dict(model=model, loss_fn=loss_fn, make_groups=make_groups, make_optimizer=make_optimizer, scaler=scaler,
                  precision=precision, batch_size=batch_size, accum_freq=accum_freq, grad_clip_norm=grad_clip_norm,
                  torchcompile=torchcompile)
    if name == "ddp":
        common.update(sync_bn=parallel.use_bn_sync, static_graph=parallel.ddp_static_graph)
    if name == "deepspeed":
        engine = DeepSpeedEngine(env, config_path=parallel.deepspeed, **common)
    else:
        engine = ENGINES[name](env, **common)
    if parallel.fsdp_shard_teacher and isinstance(teacher, nn.Module):
        engine.shard_teacher(teacher)
    return engine

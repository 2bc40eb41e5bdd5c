"""How the student is wrapped and stepped: DDP (default), FSDP2 (--fsdp), DeepSpeed ZeRO (--deepspeed), Horovod.

`wrap(...)` returns an `Engine`; the training step (train.py) and checkpoints only talk to this small interface:

    engine.model(image, text)          the wrapped StudentModel's forward
    engine.zero_grad()
    engine.micro_batch(last)           context for one backward of an accumulated step (gradient sync on the last)
    engine.backward(loss)                 (engine.scale_loss(loss) for fp16 loss scaling)
    engine.unsynced_params()           parameters the step averages itself with distributed.all_reduce_mean_
                                       (the loss-side heads, and FSDP's scalar logit scale)
    engine.clip_grad_norm_(max_norm)
    engine.step()
    engine.clamp_logit_scale_()        open_clip's clamp of the student temperature (on the master weights)
    engine.model_state_dict()          the bare student's plain state_dict (collective; complete on rank 0)
    engine.load_model_state_dict(sd)
    engine.optimizer_state_dict()      canonical format, see below (collective; complete on rank 0)
    engine.load_optimizer_state_dict(sd)
    engine.unsharded()                 context in which `trainer.student` can be called directly (evaluation)
    engine.full_grads()                {name: full gradient} between backward and step (tests, debugging)

Checkpoint format, whatever the engine: `model` is the bare open_clip student state_dict, and `optimizer` is what
`torch.optim.AdamW(param_groups(student, loss_fn)).state_dict()` holds in a plain single-process run (state keyed by
the index of the parameter in those groups, full tensors). So a checkpoint written under FSDP2 or DeepSpeed resumes
under plain DDP and the other way round.

Heavy dependencies (deepspeed, horovod) are imported only when their flag is given.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import distributed
from .errors import UsageError

LOGIT_SCALE_MAX = math.log(100)


# ---- flags ----------------------------------------------------------------------------------------------------

def engine_name(args) -> str:
    chosen = [name for name, on in (("fsdp", getattr(args, "fsdp", False)),
                                    ("deepspeed", bool(getattr(args, "deepspeed", None))),
                                    ("horovod", getattr(args, "horovod", False))) if on]
    if len(chosen) > 1:
        raise UsageError(f"choose one of --fsdp, --deepspeed, --horovod (got {', '.join('--' + c for c in chosen)})")
    return chosen[0] if chosen else "ddp"


def check_args(args) -> None:
    name = engine_name(args)
    if getattr(args, "fsdp_shard_teacher", False) and name != "fsdp":
        raise UsageError("--fsdp-shard-teacher needs --fsdp")
    if getattr(args, "accum_freq", 1) < 1:
        raise UsageError(f"--accum-freq must be >= 1, got {args.accum_freq}")
    if name == "deepspeed" and not os.path.isfile(args.deepspeed):
        raise UsageError(f"--deepspeed config not found: {args.deepspeed}")


def launch(args) -> None:
    """Before the process group exists: Horovod needs hvd.init() to tell each process its rank."""
    if engine_name(args) != "horovod":
        return
    hvd = _import_horovod()
    hvd.init()
    os.environ.setdefault("RANK", str(hvd.rank()))
    os.environ.setdefault("WORLD_SIZE", str(hvd.size()))
    os.environ.setdefault("LOCAL_RANK", str(hvd.local_rank()))
    if hvd.size() > 1 and ("MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ):
        raise UsageError("--horovod: export MASTER_ADDR and MASTER_PORT too (the distillation loss all-gathers "
                         "features through torch.distributed; see slurm/vit_t_kd.sh)")


def _import_horovod():
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        raise UsageError(f"--horovod needs horovod built with PyTorch support (pip install horovod; "
                         f"docs/scale_out.md): {exc}") from exc
    return hvd


# ---- shared helpers ---------------------------------------------------------------------------------------------

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


def _named_params_of(*modules: tuple[str, nn.Module]) -> dict[int, str]:
    return {id(p): f"{prefix}{name}" for prefix, module in modules for name, p in module.named_parameters()}


def _flat(groups: list[dict]) -> list[nn.Parameter]:
    return [p for g in groups for p in g["params"]]


def _hparams(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}


def _split_groups(groups: list[dict], side: set[int]) -> tuple[list[dict], list[dict], list[int], list[int]]:
    """Canonical groups -> (student groups, side groups, canonical index of each student / side group)."""
    main, other, main_idx, other_idx = [], [], [], []
    for j, g in enumerate(groups):
        mine = [p for p in g["params"] if id(p) not in side]
        theirs = [p for p in g["params"] if id(p) in side]
        if mine:
            main.append({**_hparams(g), "params": mine})
            main_idx.append(j)
        if theirs:
            other.append({**_hparams(g), "params": theirs})
            other_idx.append(j)
    return main, other, main_idx, other_idx


def _optimizer_format(opt: torch.optim.Optimizer, states: dict[int, dict], canon_groups: list[dict] | None,
                      group_index: list[int]) -> dict:
    """{param id: state} -> `opt`'s own state_dict format (hyper-parameters from the canonical groups if given)."""
    out_state, out_groups, i = {}, [], 0
    for j, g in enumerate(opt.param_groups):
        hp = _hparams(g)
        if canon_groups is not None:
            hp.update({k: v for k, v in canon_groups[group_index[j]].items() if k != "params"})
        ids = []
        for p in g["params"]:
            if id(p) in states:
                out_state[i] = states[id(p)]
            ids.append(i)
            i += 1
        out_groups.append({**hp, "params": ids})
    return {"state": out_state, "param_groups": out_groups}


class Optimizers:
    """The student's optimizer and the loss-side one (DeepSpeed, Horovod) seen as one by the schedule and the logs."""

    def __init__(self, *parts: torch.optim.Optimizer | None):
        self.parts = [p for p in parts if p is not None]

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.parts for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts:
            opt.zero_grad(set_to_none=set_to_none)


# ---- engines ------------------------------------------------------------------------------------------------------

class Engine:
    """Single process or DDP: the reference behaviour every other engine reproduces."""

    name = "ddp"

    def __init__(self, args, env: distributed.DistEnv, model: nn.Module, loss_fn: nn.Module,
                 make_groups: Callable[[], list[dict]], make_optimizer: Callable[[list[dict]], torch.optim.Optimizer],
                 scaler: torch.amp.GradScaler | None):
        self.args, self.env, self.loss_fn, self.scaler = args, env, loss_fn, scaler
        self.student_model = model  # the StudentModel (unwrapped)
        self.student = model.clip  # the bare open_clip model (what checkpoints and exports hold)
        self.model = self._wrap(model)
        self.groups = make_groups()  # canonical parameter groups: param_groups(student, loss_fn) after wrapping
        self.params = _flat(self.groups)
        self.optimizer = self._make_optimizer(make_optimizer)

    @classmethod
    def around(cls, args, env, model: nn.Module, student: nn.Module, loss_fn: nn.Module,
               optimizer: torch.optim.Optimizer, scaler=None) -> Engine:
        """A plain/DDP engine over an already wrapped model and a built optimizer (a Trainer built by hand)."""
        engine = cls.__new__(cls)
        engine.args, engine.env, engine.loss_fn, engine.scaler = args, env, loss_fn, scaler
        engine.model, engine.student, engine.optimizer = model, student, optimizer
        engine.student_model = getattr(model, "module", model)
        engine.groups = optimizer.param_groups
        engine.params = _flat(engine.groups)
        return engine

    # -- construction (overridden by the other engines)
    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.args.torchcompile:
            for block in blocks(model):
                block.compile()
        if self.env.distributed:
            from torch.nn.parallel import DistributedDataParallel

            dev = self.env.device
            # gradients as views of DDP's all-reduce buckets: one copy of the gradients instead of two
            return DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None,
                                           gradient_as_bucket_view=True)
        return model

    def _make_optimizer(self, make_optimizer):
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

    def unsynced_params(self) -> list[nn.Parameter]:
        return [p for p in self.loss_fn.parameters() if p.requires_grad]

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        self._unscale()
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm)

    def _unscale(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)

    def step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def clamp_logit_scale_(self) -> None:
        with torch.no_grad():
            self.student.logit_scale.clamp_(0, LOGIT_SCALE_MAX)

    def full_grads(self) -> dict[str, torch.Tensor]:
        return {n: _full(p.grad) for n, p in self.student.named_parameters() if p.grad is not None}

    # -- checkpoints
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return self.student.state_dict()

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.student.load_state_dict(state)

    def optimizer_state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def state_dict(self) -> dict:  # TEMPORARY (the parallel package split brings the real one)
        return {"model": self.model_state_dict(), "optimizer": self.optimizer_state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.load_model_state_dict(state["model"])
        self.load_optimizer_state_dict(state["optimizer"])

    def unsharded(self):
        return contextlib.nullcontext()

    def describe(self) -> str:
        return f"{self.name} over {self.env.world_size} process(es)"


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class FSDPEngine(Engine):
    """FSDP2 (`torch.distributed.fsdp.fully_shard`): every block, then the StudentModel root, sharded over ranks.

    Scalar parameters (open_clip's logit_scale) cannot be sharded: they stay replicated and are averaged by the step
    like the loss-side heads. Mixed precision follows --precision (parameters and compute in bf16/fp16, gradient
    reduction and the sharded master weights in fp32).
    """

    name = "fsdp"

    def _wrap(self, model: nn.Module) -> nn.Module:
        import inspect

        from torch.distributed.device_mesh import init_device_mesh

        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as exc:
            raise UsageError(f"--fsdp needs FSDP2 (torch >= 2.7), this is torch {torch.__version__}") from exc
        if "ignored_params" not in inspect.signature(fully_shard).parameters:
            raise UsageError(f"--fsdp needs torch >= 2.7 (fully_shard(ignored_params=...)), this is {torch.__version__}")
        _ensure_process_group(self.env)
        self.mesh = init_device_mesh(self.env.device.type, (self.env.world_size,))
        policy = fsdp_mixed_precision(self.args, self.env.device)
        self.replicated = [p for p in model.parameters() if p.ndim == 0]
        for block in blocks(model):
            if self.args.torchcompile:
                block.compile()
            fully_shard(block, mesh=self.mesh, mp_policy=policy)
        fully_shard(model, mesh=self.mesh, mp_policy=policy, ignored_params=set(self.replicated))
        self.container = nn.ModuleDict({"student": model, "loss": self.loss_fn})  # FQNs of the optimizer state
        return model

    def shard_teacher(self, teacher: nn.Module) -> None:
        """--fsdp-shard-teacher: the frozen teacher's weights sharded too (gathered block by block in its forward)."""
        from torch.distributed.fsdp import fully_shard

        policy = fsdp_mixed_precision(self.args, self.env.device)
        scalars = {p for p in teacher.parameters() if p.ndim == 0}
        for block in blocks(teacher):
            fully_shard(block, mesh=self.mesh, mp_policy=policy)
        fully_shard(teacher, mesh=self.mesh, mp_policy=policy, ignored_params=scalars)

    def micro_batch(self, last: bool):
        return contextlib.nullcontext()  # reduce-scatter every micro-batch: gradients stay sharded in between

    def unsynced_params(self) -> list[nn.Parameter]:
        return super().unsynced_params() + [p for p in self.replicated if p.requires_grad]

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        self._unscale()
        grads = [p.grad for p in self.params if p.grad is not None]
        sharded = [g for g in grads if isinstance(g, DTensor)]
        plain = [g for g in grads if not isinstance(g, DTensor)]
        norms = [_full(torch.nn.utils.get_total_norm(part)).float() for part in (sharded, plain) if part]
        total = torch.linalg.vector_norm(torch.stack(norms))
        coef = min(1.0, max_norm / (float(total) + 1e-6))
        for g in grads:
            g.mul_(coef)
        return total

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.student_model,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k[len("clip."):]: v for k, v in state.items()}

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.student_model, {f"clip.{k}": v for k, v in state.items()},
                             options=StateDictOptions(full_state_dict=True))

    def _fqns(self) -> list[str]:
        names = _named_params_of(("", self.container))
        return [names[id(p)] for p in self.params]

    def optimizer_state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        osd = get_optimizer_state_dict(self.container, self.optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not osd:
            return {}  # ranks > 0: rank 0 holds the full state
        index = {fqn: i for i, fqn in enumerate(self._fqns())}
        return {"state": {index[fqn]: s for fqn, s in osd["state"].items()},
                "param_groups": [{**_hparams(g), "params": [index[f] for f in g["params"]]}
                                 for g in osd["param_groups"]]}

    def load_optimizer_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        fqns = self._fqns()
        osd = {"state": {fqns[i]: s for i, s in state["state"].items()},
               "param_groups": [{**_hparams(g), "params": [fqns[i] for i in g["params"]]}
                                for g in state["param_groups"]]}
        set_optimizer_state_dict(self.container, self.optimizer, osd, options=StateDictOptions(full_state_dict=True))

    @contextlib.contextmanager
    def unsharded(self):
        self.model.unshard()  # the root's own parameters; blocks gather themselves in their forward
        try:
            yield
        finally:
            self.model.reshard()


def fsdp_mixed_precision(args, device: torch.device):
    """Parameters (and so compute) in the autocast dtype, gradient reduction and master weights in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from .precision import resolve

    precision = resolve(args.precision, device, getattr(args, "amp_fp16_on_cpu", False))
    dtype = precision.autocast_dtype or precision.low_precision_weights
    if dtype == torch.float16 and device.type != "cuda":
        # the CUDA fp16 path emulated on CPU: CPU autocast leaves layer_norm's fp16 weights uncast, so keep fp32
        # parameters there; gradients are then DTensors and plain tensors, as on CUDA
        return MixedPrecisionPolicy()
    if dtype is not None:
        return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _ensure_process_group(env: distributed.DistEnv) -> None:
    """FSDP2 and DeepSpeed need a process group even for one process (torchrun-less single-rank runs)."""
    if not dist.is_initialized():
        backend = "nccl" if env.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


class _SideOptimizerEngine(Engine):
    """Engines that own the student's optimizer (DeepSpeed, Horovod): the loss-side heads get their own plain
    optimizer with the same hyper-parameters, and the two are merged into the canonical checkpoint format."""

    def _make_optimizer(self, make_optimizer):
        side = {id(p) for p in self.loss_fn.parameters()}
        self.canon_groups_for_load = None
        student_groups, side_groups, self.student_index, self.side_index = _split_groups(self.groups, side)
        self.side_optimizer = make_optimizer(side_groups) if side_groups else None
        self.student_optimizer = self._student_optimizer(make_optimizer(student_groups))
        return Optimizers(self.student_optimizer, self.side_optimizer)

    def _student_optimizer(self, optimizer):
        return optimizer

    # per-parameter full states of the student optimizer (engine-specific)
    def _student_states(self) -> dict[int, dict]:
        return {id(p): dict(s) for p, s in self.student_optimizer.state.items()}

    def _load_student_states(self, states: dict[int, dict]) -> None:
        self.student_optimizer.load_state_dict(
            _optimizer_format(self.student_optimizer, states, self.canon_groups_for_load, self.student_index))

    def optimizer_state_dict(self) -> dict:
        states = self._student_states()
        if self.side_optimizer is not None:
            states.update({id(p): dict(s) for p, s in self.side_optimizer.state.items()})
        index = {id(p): i for i, p in enumerate(self.params)}
        groups, i = [], 0
        for j, g in enumerate(self.groups):
            source = (self.student_optimizer.param_groups[self.student_index.index(j)] if j in self.student_index
                      else self.side_optimizer.param_groups[self.side_index.index(j)])
            groups.append({**_hparams(source), "params": list(range(i, i + len(g["params"])))})
            i += len(g["params"])
        return {"state": {index[pid]: s for pid, s in states.items() if pid in index}, "param_groups": groups}

    def load_optimizer_state_dict(self, state: dict) -> None:
        by_id = {id(self.params[i]): s for i, s in state["state"].items()}
        self.canon_groups_for_load = state["param_groups"]
        self._load_student_states({k: v for k, v in by_id.items() if k in self._student_ids()})
        if self.side_optimizer is not None:
            self.side_optimizer.load_state_dict(
                _optimizer_format(self.side_optimizer, by_id, state["param_groups"], self.side_index))

    def _student_ids(self) -> set[int]:
        return {id(p) for p in self.student.parameters()}

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.student_optimizer.step()
        if self.side_optimizer is not None:
            self.side_optimizer.step()


class DeepSpeedEngine(_SideOptimizerEngine):
    """DeepSpeed ZeRO stage 0-3 from a JSON config; our AdamW becomes the ZeRO optimizer's base optimizer.

    Filled in from the flags (a config that sets them differently is an error): batch sizes, gradient accumulation
    (driven by the step through set_gradient_accumulation_boundary), gradient clipping (of the student; the loss-side
    heads are clipped to the same norm on their own), bf16 from --precision bf16.
    """

    name = "deepspeed"

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.args.torchcompile:
            for block in blocks(model):
                block.compile()
        _ensure_process_group(self.env)
        return model  # deepspeed.initialize needs the optimizer: see _make_optimizer

    def _student_optimizer(self, optimizer):
        try:
            import deepspeed
        except ImportError as exc:
            raise UsageError(f"--deepspeed needs DeepSpeed (pip install deepspeed; docs/scale_out.md): {exc}") from exc

        self.config = deepspeed_config(self.args, self.env.world_size)
        os.environ.setdefault("LOCAL_RANK", str(self.env.local_rank))  # one process without a launcher
        with _broadcast_scalars_ourselves():
            engine, ds_optimizer, _, _ = deepspeed.initialize(model=self.student_model, optimizer=optimizer,
                                                              config=self.config, dist_init_required=False)
        self.model, self.ds_optimizer, self.base_optimizer = engine, ds_optimizer, optimizer
        self.stage = int(self.config.get("zero_optimization", {}).get("stage", 0))
        return optimizer  # its param_groups are the ones DeepSpeed steps: the schedule sets lr there

    def micro_batch(self, last: bool):
        self.model.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, prescaled: bool = False) -> None:
        self.model.backward(loss, scale_wrt_gas=False)  # accumulated steps backprop exact gradients already

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        side = [p for p in self.unsynced_params() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(side, max_norm) if side else torch.zeros(())

    def step(self) -> None:
        self.model.step()
        if self.side_optimizer is not None:
            self.side_optimizer.step()

    def zero_grad(self) -> None:
        self.model.zero_grad()
        if self.side_optimizer is not None:
            self.side_optimizer.zero_grad(set_to_none=True)

    def clamp_logit_scale_(self) -> None:
        from deepspeed.utils import safe_get_full_fp32_param

        p = self.student.logit_scale
        master = safe_get_full_fp32_param(p)
        value = master if master is not None else p.detach()
        if float(value) > LOGIT_SCALE_MAX or float(value) < 0:
            self._set_param(p, value.clamp(0, LOGIT_SCALE_MAX))

    def _set_param(self, p: nn.Parameter, value: torch.Tensor) -> None:
        """Every rank holds `value` (the full parameter): set the fp32 master and the working copy."""
        self._set_full(p, value)
        if self.stage == 3:
            self._refresh_partitions()
        if p.data.numel() == value.numel():  # ZeRO 0-2, or a ZeRO-3 parameter currently gathered
            with torch.no_grad():
                p.data.copy_(value.reshape(p.data.shape).to(p.dtype))

    def _set_full(self, p: nn.Parameter, value: torch.Tensor, key: str | None = None) -> None:
        """This rank's piece of the fp32 master weight (key None) or optimizer state `key` of `p` from its full value.

        ZeRO-3 is done here: DeepSpeed's set_full_hp_param cuts the last partition past the end of parameters whose
        size is not a multiple of the world size (0.19: "start + length exceeds dimension size")."""
        value = value.to(torch.float32).to(self.env.device)
        if not hasattr(p, "ds_id"):
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

            return safe_set_full_fp32_param(p, value) if key is None else safe_set_full_optimizer_state(p, value, key)
        opt = self.ds_optimizer
        part, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=True, optim_state_key=key)
        start = part.numel() * opt._get_param_partition_rank(p)
        piece = value.flatten()[start:start + part.numel()]
        with torch.no_grad():
            part.zero_()
            part[:piece.numel()].copy_(piece)

    def _refresh_partitions(self) -> None:
        """ZeRO-3: the working (bit16 or fp32) partitions from the fp32 master partitions, as after a step."""
        opt = self.ds_optimizer
        for i in range(len(opt.fp16_partitioned_groups_flat)):
            opt._reassign_or_swap_out_partitioned_parameters(i)

    def _gathered(self, params):
        """ZeRO-3: the full weights inside the context (read only)."""
        if self.stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(params)
        return contextlib.nullcontext()

    def full_grads(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_grad

        out = {}
        for n, p in self.student.named_parameters():
            g = safe_get_full_grad(p)
            if g is not None:
                out[n] = g.detach().clone()
        return out

    # -- checkpoints: the fp32 master weights and the optimizer state, gathered parameter by parameter
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        with self._gathered(list(self.student.parameters())):
            state = {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()}
        for name, p in self.student.named_parameters():
            master = safe_get_full_fp32_param(p)
            if master is not None:  # the fp32 master itself (under bf16 the module holds a rounded copy)
                state[name] = master.detach().float().cpu().reshape(state[name].shape)
        return state

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Every rank loads the full state (as in the other engines) and keeps its partition of it."""
        params = dict(self.student.named_parameters())
        if self.stage == 3:  # parameters are partitioned: load the buffers here, the parameters below
            expected = set(self.student.state_dict())
            if set(state) != expected:
                raise UsageError(f"checkpoint does not match the student: missing {sorted(expected - set(state))[:3]}, "
                                 f"unexpected {sorted(set(state) - expected)[:3]}")
            self.student.load_state_dict({k: v for k, v in state.items() if k not in params}, strict=False)
        else:
            self.student.load_state_dict(state)
        for name, p in params.items():
            self._set_full(p, state[name])
        if self.stage == 3:
            self._refresh_partitions()
            with torch.no_grad():
                for name, p in params.items():
                    if p.data.numel() == state[name].numel():  # persistent parameters already gathered
                        p.data.copy_(state[name].reshape(p.data.shape).to(p.dtype))

    def _flat_partitions(self) -> list[torch.Tensor]:
        """The flat fp32 partitions the base optimizer steps (ZeRO 1/2, ZeRO 3, DeepSpeed's bf16 optimizer)."""
        for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
            flats = getattr(self.ds_optimizer, attr, None)
            if flats:
                return list(flats)
        return []

    def _zero(self) -> bool:
        """True when the optimizer state lives in DeepSpeed's flat partitions (else: plain per-parameter state)."""
        p = next(self.student.parameters())
        return (hasattr(p, "_hp_mapping") or hasattr(p, "ds_id")) and bool(self._flat_partitions())

    def _student_states(self) -> dict[int, dict]:
        if not self._zero():
            return super()._student_states()
        from deepspeed.utils import safe_get_full_optimizer_state

        base_state = self.base_optimizer.state
        flats = [f for f in self._flat_partitions() if f in base_state]
        if not flats:
            return {}  # no step taken yet
        first = base_state[flats[0]]
        keys = [k for k, v in first.items() if torch.is_tensor(v) and k != "step"]
        self._link_optimizer_state()
        out = {}
        for p in self.student.parameters():
            if not p.requires_grad:  # a locked tower (--lock-image/--lock-text): not in the optimizer
                continue
            entry = {"step": first["step"].detach().cpu().clone()} if "step" in first else {}
            for k in keys:
                full = safe_get_full_optimizer_state(p, k)
                entry[k] = full.detach().cpu().reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape).clone()
            out[id(p)] = entry
        return out

    def _load_student_states(self, states: dict[int, dict]) -> None:
        if not self._zero():
            return super()._load_student_states(states)
        if not states:
            return
        sample = next(iter(states.values()))
        keys = [k for k, v in sample.items() if torch.is_tensor(v) and k != "step"]
        base_state = self.base_optimizer.state
        for flat in self._flat_partitions():  # make sure the flat state exists, then overwrite it piece by piece
            entry = base_state.setdefault(flat, {})
            for k in keys:
                entry.setdefault(k, torch.zeros_like(flat))
            if "step" in sample:
                entry["step"] = sample["step"].clone()
        self._link_optimizer_state()
        for p in self.student.parameters():
            if id(p) in states:
                for k in keys:
                    self._set_full(p, states[id(p)][k], k)

    def _link_optimizer_state(self) -> None:
        """(Re)link every parameter's view of the flat ZeRO-1/2 optimizer state. DeepSpeed links them once, right after
        the FIRST parameter group's first step, when the other groups have no state yet (their views stay empty)."""
        opt = self.ds_optimizer
        if not (hasattr(opt, "bit16_groups") and hasattr(opt, "single_partition_of_fp32_groups")):
            return  # ZeRO-3 reads its flat state directly
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        for lp_params, flat in zip(opt.bit16_groups, opt.single_partition_of_fp32_groups):
            if self.base_optimizer.state.get(flat):
                lazy_init_hp_params_optimizer_state(lp_params, flat, self.base_optimizer.state)

    @contextlib.contextmanager
    def unsharded(self):
        with self._gathered(list(self.student.parameters())):
            yield


@contextlib.contextmanager
def _broadcast_scalars_ourselves():
    """DeepSpeed (0.19) broadcasts the initial weights as uint8 views, which fails on 0-dim parameters (open_clip's
    logit_scale: "self.dim() cannot be 0 to view Float as Byte"), in the engine and in ZeRO-3's parameter conversion.
    Broadcast 0-dim parameters with a plain broadcast instead, for the time of deepspeed.initialize."""
    import deepspeed.comm as ds_dist
    from deepspeed.runtime.engine import DeepSpeedEngine as _DS
    from deepspeed.runtime.zero.partition_parameters import Init

    original_broadcast, original_init = _DS._broadcast_model, Init._zero_init_param

    def broadcast_model(self):
        if self.dist_backend is not None and not any(hasattr(p, "ds_id") for p in self.module.parameters()):
            distributed.broadcast_module_(self.module)
        else:
            original_broadcast(self)

    def zero_init_param(self, param):
        if param.dim() > 0:
            return original_init(self, param)
        self._convert_to_deepspeed_param(param)
        group = self.get_partition_dp_group(param)
        src = 0 if ds_dist.get_world_group() == group else ds_dist.get_global_rank(group, 0)
        ds_dist.broadcast(param.data, src, group)
        param.partition()

    _DS._broadcast_model, Init._zero_init_param = broadcast_model, zero_init_param
    try:
        yield
    finally:
        _DS._broadcast_model, Init._zero_init_param = original_broadcast, original_init


def deepspeed_config(args, world_size: int) -> dict:
    """The user's JSON with the fields the flags own filled in; a conflicting value is a usage error."""
    with open(args.deepspeed) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--deepspeed {args.deepspeed} is not valid JSON: {exc}") from exc
    accum = getattr(args, "accum_freq", 1)
    owned = {"train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": accum,
             "train_batch_size": args.batch_size * accum * world_size,
             # DeepSpeed clips to 1.0 unless told otherwise: no clipping without --grad-clip-norm, as everywhere else
             "gradient_clipping": args.grad_clip_norm if args.grad_clip_norm is not None else 0.0}
    for key, value in owned.items():
        if key in cfg and cfg[key] != "auto" and cfg[key] != value:
            raise UsageError(f"--deepspeed config sets {key}={cfg[key]} but the flags give {value}: remove it from "
                             "the JSON (batch size, --accum-freq and --grad-clip-norm come from the flags)")
        cfg[key] = value
    for key in ("fp16", "bf16"):
        if cfg.get(key, {}).get("enabled", False) and not (key == "bf16" and args.precision == "bf16"):
            raise UsageError(f"--deepspeed config enables {key}: use --precision bf16 (the flag drives precision)")
    if args.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    cfg.setdefault("zero_allow_untested_optimizer", True)
    cfg.setdefault("steps_per_print", 2 ** 31 - 1)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


class HorovodEngine(_SideOptimizerEngine):
    """Horovod's DistributedOptimizer averages the student's gradients (open_clip's --horovod); the distillation
    loss still all-gathers features through torch.distributed (initialised from Horovod's ranks, see `launch`)."""

    name = "horovod"

    def _wrap(self, model: nn.Module) -> nn.Module:
        self.hvd = _import_horovod()
        if self.args.torchcompile:
            for block in blocks(model):
                block.compile()
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        return model

    def _student_optimizer(self, optimizer):
        return self.hvd.DistributedOptimizer(optimizer, named_parameters=self.student_model.named_parameters(),
                                             backward_passes_per_step=getattr(self.args, "accum_freq", 1))

    def zero_grad(self) -> None:
        self.student_optimizer.zero_grad()  # Horovod's takes no set_to_none (it sets gradients to None)
        if self.side_optimizer is not None:
            self.side_optimizer.zero_grad(set_to_none=True)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        self.student_optimizer.synchronize()
        self._synchronized = True
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm)

    def step(self) -> None:
        if getattr(self, "_synchronized", False):
            with self.student_optimizer.skip_synchronize():
                self.student_optimizer.step()
            self._synchronized = False
        else:
            self.student_optimizer.step()
        if self.side_optimizer is not None:
            self.side_optimizer.step()


ENGINES: dict[str, type[Engine]] = {"ddp": Engine, "fsdp": FSDPEngine, "deepspeed": DeepSpeedEngine,
                                    "horovod": HorovodEngine}


def wrap(args, env: distributed.DistEnv, model: nn.Module, loss_fn: nn.Module, teacher: Any,
         make_groups: Callable[[], list[dict]], make_optimizer: Callable[[list[dict]], torch.optim.Optimizer],
         scaler: torch.amp.GradScaler | None = None) -> Engine:
    """Wrap the StudentModel `model` with the engine the flags choose and build its optimizer.

    `make_groups()` returns the canonical parameter groups (called after wrapping: FSDP2 replaces the parameters);
    `make_optimizer(groups)` builds the torch optimizer.
    """
    check_args(args)
    name = engine_name(args)
    if scaler is not None and name in ("deepspeed", "horovod"):  # --precision amp on CUDA: fp16 with a GradScaler
        raise UsageError(f"--{name} runs with --precision amp_bf16, bf16 or fp32: fp16 loss scaling is not wired "
                         "through its optimizer (DeepSpeed's scaler would also scale the loss-side heads)")
    engine = ENGINES[name](args, env, model, loss_fn, make_groups, make_optimizer, scaler)
    if getattr(args, "fsdp_shard_teacher", False) and isinstance(teacher, nn.Module):
        engine.shard_teacher(teacher)
    return engine

"""DeepSpeed ZeRO stage 0-3 from a JSON config: the engine, its config and its work-arounds for DeepSpeed 0.19."""

from __future__ import annotations

import contextlib
import json
import os

import torch
from torch import nn

from .. import distributed
from ..errors import UsageError
from .ddp import LOGIT_SCALE_MAX, compile_blocks, ensure_process_group
from .optim_state import SideOptimizerEngine


def deepspeed_config(path: str, *, batch_size: int, accum_freq: int, grad_clip_norm: float | None, precision: str,
                     world_size: int) -> dict:
    """The user's JSON (--deepspeed `path`) with the fields the flags own filled in; a conflicting value is a usage
    error. `precision` is the --precision name."""
    with open(path) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--deepspeed {path} is not valid JSON: {exc}") from exc
    owned = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": accum_freq,
             "train_batch_size": batch_size * accum_freq * world_size,
             # DeepSpeed clips to 1.0 unless told otherwise: no clipping without --grad-clip-norm, as everywhere else
             "gradient_clipping": grad_clip_norm if grad_clip_norm is not None else 0.0}
    for key, value in owned.items():
        if key in cfg and cfg[key] != "auto" and cfg[key] != value:
            raise UsageError(f"--deepspeed config sets {key}={cfg[key]} but the flags give {value}: remove it from "
                             "the JSON (batch size, --accum-freq and --grad-clip-norm come from the flags)")
        cfg[key] = value
    for key in ("fp16", "bf16"):
        if cfg.get(key, {}).get("enabled", False) and not (key == "bf16" and precision == "bf16"):
            raise UsageError(f"--deepspeed config enables {key}: use --precision bf16 (the flag drives precision)")
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    cfg.setdefault("zero_allow_untested_optimizer", True)
    cfg.setdefault("steps_per_print", 2 ** 31 - 1)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


class DeepSpeedEngine(SideOptimizerEngine):
    """DeepSpeed ZeRO stage 0-3 from a JSON config; our AdamW becomes the ZeRO optimizer's base optimizer.

    Filled in from the flags (a config that sets them differently is an error): batch sizes, gradient accumulation
    (driven by the step through set_gradient_accumulation_boundary), gradient clipping (of the student; the loss-side
    heads are clipped to the same norm on their own), bf16 from --precision bf16.
    """

    name = "deepspeed"

    def __init__(self, env: distributed.DistEnv, *, config_path: str, **common):
        self.config_path = config_path  # --deepspeed: read when the student's optimizer is built
        super().__init__(env, **common)

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.torchcompile:
            compile_blocks(model)
        ensure_process_group(self.env)
        return model  # deepspeed.initialize needs the optimizer: see _make_optimizer

    def _student_optimizer(self, optimizer):
        try:
            import deepspeed
        except ImportError as exc:
            raise UsageError(f"--deepspeed needs DeepSpeed (pip install deepspeed; docs/scale_out.md): {exc}") from exc

        self.config = deepspeed_config(self.config_path, batch_size=self.batch_size, accum_freq=self.accum_freq,
                                       grad_clip_norm=self.grad_clip_norm, precision=self.precision.name,
                                       world_size=self.env.world_size)
        os.environ.setdefault("LOCAL_RANK", str(self.env.local_rank))  # one process without a launcher
        with _broadcast_scalars_ourselves():
            engine, ds_optimizer, _, _ = deepspeed.initialize(model=self.unwrapped, optimizer=optimizer,
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

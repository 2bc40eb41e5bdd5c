"""FSDP2 (`torch.distributed.fsdp.fully_shard`): the student, and with --fsdp-shard-teacher the teacher, sharded."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import UsageError
from ..precision import Precision
from .ddp import Engine, blocks, ensure_process_group, full_tensor
from .optim_state import hparams, named_params_of


def fsdp_mixed_precision(precision: Precision):
    """Parameters (and so compute) in the autocast dtype, gradient reduction and master weights in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = precision.autocast_dtype or precision.low_precision_weights
    if dtype == torch.float16 and precision.device_type != "cuda":
        # the CUDA fp16 path emulated on CPU: CPU autocast leaves layer_norm's fp16 weights uncast, so keep fp32
        # parameters there; gradients are then DTensors and plain tensors, as on CUDA
        return MixedPrecisionPolicy()
    if dtype is not None:
        return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


class FSDPEngine(Engine):
    """Every block, then the StudentModel root, sharded over ranks.

    Scalar parameters (open_clip's logit_scale) cannot be sharded: they stay replicated and are averaged by `update`
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
        ensure_process_group(self.env)
        self.mesh = init_device_mesh(self.env.device.type, (self.env.world_size,))
        policy = fsdp_mixed_precision(self.precision)
        self.replicated = [p for p in model.parameters() if p.ndim == 0]
        for block in blocks(model):
            if self.torchcompile:
                block.compile()
            fully_shard(block, mesh=self.mesh, mp_policy=policy)
        fully_shard(model, mesh=self.mesh, mp_policy=policy, ignored_params=set(self.replicated))
        self.container = nn.ModuleDict({"student": model, "loss": self.loss_fn})  # FQNs of the optimizer state
        return model

    def shard_teacher(self, teacher: nn.Module) -> None:
        """--fsdp-shard-teacher: the frozen teacher's weights sharded too (gathered block by block in its forward)."""
        from torch.distributed.fsdp import fully_shard

        policy = fsdp_mixed_precision(self.precision)
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
        norms = [full_tensor(torch.nn.utils.get_total_norm(part)).float() for part in (sharded, plain) if part]
        total = torch.linalg.vector_norm(torch.stack(norms))
        coef = min(1.0, max_norm / (float(total) + 1e-6))
        for g in grads:
            g.mul_(coef)
        return total

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.unwrapped,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k[len("clip."):]: v for k, v in state.items()}

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.unwrapped, {f"clip.{k}": v for k, v in state.items()},
                             options=StateDictOptions(full_state_dict=True))

    def _fqns(self) -> list[str]:
        names = named_params_of(("", self.container))
        return [names[id(p)] for p in self.params]

    def optimizer_state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        osd = get_optimizer_state_dict(self.container, self.optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not osd:
            return {}  # ranks > 0: rank 0 holds the full state
        index = {fqn: i for i, fqn in enumerate(self._fqns())}
        return {"state": {index[fqn]: s for fqn, s in osd["state"].items()},
                "param_groups": [{**hparams(g), "params": [index[f] for f in g["params"]]}
                                 for g in osd["param_groups"]]}

    def load_optimizer_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        fqns = self._fqns()
        osd = {"state": {fqns[i]: s for i, s in state["state"].items()},
               "param_groups": [{**hparams(g), "params": [fqns[i] for i in g["params"]]}
                                for g in state["param_groups"]]}
        set_optimizer_state_dict(self.container, self.optimizer, osd, options=StateDictOptions(full_state_dict=True))

    @contextlib.contextmanager
    def unsharded(self):
        self.model.unshard()  # the root's own parameters; blocks gather themselves in their forward
        try:
            yield
        finally:
            self.model.reshard()

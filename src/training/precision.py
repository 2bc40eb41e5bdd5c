"""What `--precision` means on a device: autocast dtype, the dtype of the batch and weights, fp16 loss scaling.

open_clip's names:

| precision | CUDA | CPU |
|---|---|---|
| `fp32` | fp32 | fp32 |
| `amp` | fp16 autocast + GradScaler | bf16 autocast (fp16 + GradScaler with `--amp-fp16-on-cpu`, the CUDA path emulated) |
| `amp_bf16` | bf16 autocast | bf16 autocast |
| `bf16` | bf16 weights and batch (no autocast; open_clip's manual low precision) | the same |

Under FSDP2 and DeepSpeed the weights of `bf16` are cast by the engine itself (fp32 master weights); elsewhere the
student is built as open_clip builds `precision="bf16"` (LayerNorms and the logit scale stay fp32).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

PRECISIONS = ("fp32", "amp", "amp_bf16", "bf16")


@dataclass(frozen=True)
class Precision:
    name: str
    device_type: str
    autocast_dtype: torch.dtype | None  # None: no autocast
    batch_dtype: torch.dtype  # dtype the images are cast to before the forward
    loss_scaling: bool  # fp16 autocast: a GradScaler scales the loss

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype)

    @property
    def low_precision_weights(self) -> torch.dtype | None:
        return torch.bfloat16 if self.name == "bf16" else None


def resolve(name: str, device: torch.device, amp_fp16_on_cpu: bool = False) -> Precision:
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r} (one of {', '.join(PRECISIONS)})")
    fp16_amp = name == "amp" and (device.type == "cuda" or amp_fp16_on_cpu)
    if name == "amp":
        autocast = torch.float16 if fp16_amp else torch.bfloat16
    else:
        autocast = torch.bfloat16 if name == "amp_bf16" else None
    return Precision(name, device.type, autocast, input_dtype(name), loss_scaling=fp16_amp)


def autocast_for(precision: str, device: torch.device, amp_fp16_on_cpu: bool = False):
    """A factory of autocast contexts for `precision` on `device` (kept for callers that take a precision name)."""
    return resolve(precision, device, amp_fp16_on_cpu).autocast


def input_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def module_input_dtype(module) -> torch.dtype:
    """The dtype of a module's first convolution or linear weight (the batch's first consumer): what a forward
    outside the training step (evaluation, a bare student) casts its images to. open_clip's bf16 towers keep
    embeddings and norms in fp32, so the first parameter's dtype would not do."""
    if not hasattr(module, "modules"):
        return torch.float32
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.weight.is_floating_point():
            return m.weight.dtype
    return torch.float32


def make_grad_scaler(precision: Precision, sharded: bool = False):
    """The fp16 loss scaler, or None. Under FSDP2 gradients are a mix of DTensor shards and plain tensors (the
    replicated logit scale, the loss-side heads), which GradScaler cannot unscale together: see ShardedScaler."""
    if not precision.loss_scaling:
        return None
    if sharded:
        return ShardedScaler(device=precision.device_type)
    return torch.amp.GradScaler(precision.device_type)


class ShardedScaler(ShardedGradScaler):
    """torch's ShardedGradScaler (found-inf all-reduced over ranks, so every rank skips the same steps) that unscales
    DTensor gradients through their local shards, grouped apart from plain tensors."""

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16=True):
        from collections import defaultdict

        from torch.amp.grad_scaler import _MultiDeviceReplicator
        from torch.distributed.tensor import DTensor

        per_device_inv_scale = _MultiDeviceReplicator(inv_scale)
        per_device_found_inf = _MultiDeviceReplicator(found_inf)
        grouped: dict = defaultdict(lambda: defaultdict(list))
        with torch.no_grad():
            for group in optimizer.param_groups:
                for param in group["params"]:
                    grad = param.grad
                    if grad is None:
                        continue
                    local = grad._local_tensor if isinstance(grad, DTensor) else grad  # in place: the shard itself
                    if local.numel():
                        grouped[local.device][local.dtype].append(local)
            for device, per_dtype in grouped.items():
                for grads in per_dtype.values():
                    torch._amp_foreach_non_finite_check_and_unscale_(
                        grads, per_device_found_inf.get(device), per_device_inv_scale.get(device))
        if not per_device_found_inf._per_device_tensors:
            per_device_found_inf.get(self._scale.device)
        return per_device_found_inf._per_device_tensors

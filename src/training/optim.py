"""AdamW over the student and the loss-side parameters, with open_clip's weight-decay grouping."""

from __future__ import annotations

import torch

from .config import OptimConfig


def param_groups(student: torch.nn.Module, loss_fn: torch.nn.Module, wd: float) -> list[dict]:
    """open_clip's grouping for the student (no weight decay on gains, biases, norms and the logit scale); the loss
    module names its own no-decay parameters (learnable scales, log-variances, biases)."""
    def student_no_decay(name: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    loss_no_wd = loss_fn.no_weight_decay_names()
    decay, no_wd = [], []
    for name, p in student.named_parameters():
        if p.requires_grad:
            (no_wd if student_no_decay(name, p) else decay).append(p)
    for name, p in loss_fn.named_parameters():
        if p.requires_grad:
            (no_wd if name in loss_no_wd else decay).append(p)
    return [{"params": no_wd, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}]


def create_optimizer(groups: list[dict], optim: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=optim.lr, eps=optim.eps, betas=(optim.beta1, optim.beta2))

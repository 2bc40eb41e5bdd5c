"""The optimizer over the student and the loss-side parameters, with open_clip's weight-decay grouping: AdamW, or
(`--opt timm/NAME`, as open_clip_train) any optimizer of timm's factory over the same groups."""

from __future__ import annotations

import torch

from .config import OptimConfig
from .errors import UsageError, usage_error


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


def timm_name(opt: str) -> str | None:
    """The timm optimizer name of --opt (None: torch's AdamW). `timm/NAME` is open_clip's spelling; a bare NAME other
    than adamw is timm's too (timm's `sgd` is Nesterov SGD, `momentum` plain SGD with momentum)."""
    opt = opt.lower()
    if opt == "adamw":
        return None
    return opt.split("timm/", 1)[-1]


def check_optimizer(optim: OptimConfig) -> None:
    """--opt names an optimizer timm knows; --momentum only with a momentum optimizer (one UsageError line)."""
    name = timm_name(optim.opt)
    if name is None:
        if optim.momentum is not None:
            raise UsageError("--momentum has no effect with --opt adamw: use it with --opt timm/sgd or timm/momentum")
        return
    from timm.optim import list_optimizers

    known = set(list_optimizers())
    if name not in known:
        raise UsageError(f"--opt {optim.opt}: timm has no optimizer '{name}' (e.g. adamw, timm/sgd, "
                         f"timm/momentum, timm/lamb, timm/lion)")


def create_optimizer(groups: list[dict], optim: OptimConfig) -> torch.optim.Optimizer:
    name = timm_name(optim.opt)
    if name is None:
        return torch.optim.AdamW(groups, lr=optim.lr, eps=optim.eps, betas=(optim.beta1, optim.beta2))
    from timm.optim import create_optimizer_v2

    kwargs = {"betas": (optim.beta1, optim.beta2), "eps": optim.eps}
    if optim.momentum is not None:
        kwargs["momentum"] = optim.momentum
    # the groups carry their own weight_decay (0 for gains, biases, scales); timm filters only modules, not groups
    try:
        return create_optimizer_v2(groups, name, lr=optim.lr, weight_decay=optim.wd, **kwargs)
    except (TypeError, ValueError) as exc:
        raise usage_error(f"--opt {optim.opt}", exc) from exc

"""Learning-rate schedule per optimizer step: open_clip_train's cosine, const and const-cooldown, with linear
warm-up; --skip-scheduler keeps --lr throughout."""

from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, warmup: int, total_steps: int, kind: str = "cosine", cooldown_steps: int = 0,
          cooldown_power: float = 1.0, cooldown_end_lr: float = 0.0) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if kind == "const":
        return base_lr
    if kind == "const-cooldown":
        start = total_steps - cooldown_steps
        if step < start:
            return base_lr
        progress = min(1.0, (step - start) / max(1, total_steps - start))
        return (1 - progress) ** cooldown_power * (base_lr - cooldown_end_lr) + cooldown_end_lr
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return 0.5 * (1 + math.cos(math.pi * progress)) * base_lr


class LRSchedule:
    """Stateless apart from the step the trainer passes in, so resume needs only the global step. `skip`: the
    optimizer keeps base_lr (open_clip's --skip-scheduler never calls its scheduler)."""

    def __init__(self, optimizer, base_lr: float, warmup: int, total_steps: int, kind: str = "cosine",
                 cooldown_steps: int = 0, cooldown_power: float = 1.0, cooldown_end_lr: float = 0.0,
                 skip: bool = False):
        self.optimizer, self.base_lr, self.warmup, self.total_steps, self.kind = (
            optimizer, base_lr, warmup, total_steps, kind)
        self.cooldown = dict(cooldown_steps=cooldown_steps, cooldown_power=cooldown_power,
                             cooldown_end_lr=cooldown_end_lr)
        self.skip = skip

    @classmethod
    def from_config(cls, optimizer, optim, steps_per_epoch: int) -> LRSchedule:
        """The schedule of an OptimConfig over `steps_per_epoch` optimizer steps an epoch."""
        return cls(optimizer, optim.lr, optim.warmup, steps_per_epoch * optim.epochs, optim.lr_scheduler,
                   cooldown_steps=steps_per_epoch * (optim.epochs_cooldown or 0),
                   cooldown_power=optim.lr_cooldown_power, cooldown_end_lr=optim.lr_cooldown_end,
                   skip=optim.skip_scheduler)

    def __call__(self, step: int) -> float:
        lr = self.base_lr if self.skip else lr_at(step, self.base_lr, self.warmup, self.total_steps, self.kind,
                                                  **self.cooldown)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

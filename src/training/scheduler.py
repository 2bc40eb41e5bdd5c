"""Learning-rate schedule per optimizer step (open_clip's cosine with linear warm-up)."""

from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, warmup: int, total_steps: int, kind: str = "cosine") -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if kind == "const":
        return base_lr
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return 0.5 * (1 + math.cos(math.pi * progress)) * base_lr


class LRSchedule:
    """Stateless apart from the step the trainer passes in, so resume needs only the global step."""

    def __init__(self, optimizer, base_lr: float, warmup: int, total_steps: int, kind: str = "cosine"):
        self.optimizer, self.base_lr, self.warmup, self.total_steps, self.kind = (
            optimizer, base_lr, warmup, total_steps, kind)

    def __call__(self, step: int) -> float:
        lr = lr_at(step, self.base_lr, self.warmup, self.total_steps, self.kind)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

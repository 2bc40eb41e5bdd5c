"""Task-specific distillation into a classifier (`--student-kind classifier`): the student's class logits learn the
teacher's class logits, KL at a temperature, plus optional cross-entropy on the labelled samples.

    teacher logits  z_t = x_t W^T + b        x_t: the teacher's L2-normalised image embedding
                    text head:   W = exp(teacher logit scale) * class embeddings (zero-shot prompts), b = 0
                    linear head: (W, b) a logistic regression fitted on the teacher's features of the labelled split
    kd = tau^2 * mean_i KL(softmax(z_t,i / tau) || softmax(z_s,i / tau))      over every sample (labelled or not)
    ce = mean over labelled samples (label >= 0) of CE(z_s,i, y_i)              0 when the batch has none
    total = kd_weight * kd + ce_weight * ce

The tau^2 factor keeps the gradient scale independent of tau (Hinton et al. 2015). The teacher head is a frozen
buffer set once before training (`set_teacher_head`) and saved in the checkpoint's loss state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .spec import SpecError

TEACHER_HEADS = ("text", "linear")


def classifier_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    log_p_s = F.log_softmax(student_logits.float() / tau, dim=-1)
    p_t = F.softmax(teacher_logits.float() / tau, dim=-1)
    return tau * tau * (p_t * (torch.log(p_t.clamp_min(1e-12)) - log_p_s)).sum(-1).mean()


def labelled_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    known = labels >= 0
    if not known.any():
        return student_logits.sum() * 0.0  # in the graph, zero
    return F.cross_entropy(student_logits[known].float(), labels[known])


class ClassifierDistillLoss(nn.Module):
    """The loss module the trainer runs for classifier students (the interface of DistillLoss it uses)."""

    needs_intermediates = False
    mask_ratio = 0.0
    teacher_towers = frozenset({"image"})  # the class logits come from the teacher's image embedding

    def __init__(self, num_classes: int, teacher_dim: int, teacher_head: str = "text", kd_temperature: float = 1.0,
                 kd_weight: float = 1.0, ce_weight: float = 0.0):
        super().__init__()
        if teacher_head not in TEACHER_HEADS:
            raise SpecError(f"unknown teacher head '{teacher_head}' ({', '.join(TEACHER_HEADS)})")
        if not kd_temperature > 0:
            raise SpecError(f"kd temperature must be > 0, got {kd_temperature}")
        if kd_weight < 0 or ce_weight < 0 or kd_weight + ce_weight == 0:
            raise SpecError(f"classifier loss weights must be >= 0 and not both 0 (kd {kd_weight}, ce {ce_weight})")
        self.teacher_head, self.tau = teacher_head, float(kd_temperature)
        self.kd_weight, self.ce_weight = float(kd_weight), float(ce_weight)
        self.needs_teacher = self.kd_weight > 0  # labels only (kd weight 0): the teacher does not run
        self.register_buffer("head_weight", torch.zeros(num_classes, teacher_dim))
        self.register_buffer("head_bias", torch.zeros(num_classes))

    def set_teacher_head(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        if tuple(weight.shape) != tuple(self.head_weight.shape):
            raise SpecError(f"teacher head of shape {tuple(weight.shape)}, expected {tuple(self.head_weight.shape)}")
        with torch.no_grad():
            self.head_weight.copy_(weight)
            self.head_bias.copy_(bias if bias is not None else torch.zeros_like(self.head_bias))

    def teacher_logits(self, teacher_image: torch.Tensor) -> torch.Tensor:
        return F.normalize(teacher_image.to(self.head_weight.dtype), dim=-1) @ self.head_weight.T + self.head_bias

    def forward(self, student_logits: torch.Tensor, teacher_image: torch.Tensor, labels: torch.Tensor,
                step: int = 0) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        total = 0.0
        if self.kd_weight:
            out["kd"] = self.kd_weight * classifier_kd(student_logits, self.teacher_logits(teacher_image), self.tau)
            total = total + out["kd"]
        if self.ce_weight:
            out["ce"] = self.ce_weight * labelled_ce(student_logits, labels)
            total = total + out["ce"]
        out["total"] = total
        return out

    # ---- what the trainer and the engines ask of a loss module ---------------------------------------------
    def describe(self) -> str:
        return (f"classifier KD from the teacher's {self.teacher_head} head ({self.head_weight.shape[0]} classes), "
                f"tau={self.tau:g}, kd weight {self.kd_weight:g}, label CE weight {self.ce_weight:g}")

    def effective_weights(self, step: int) -> dict[str, float]:
        return {k: w for k, w in (("kd", self.kd_weight), ("ce", self.ce_weight)) if w}

    def sync_(self) -> None:  # no learnable parameters; the head is set identically on every rank
        pass

    def no_weight_decay_names(self) -> set[str]:
        return set()

"""`DistillLoss`: the loss-side nn.Module (projections, learnable scales, uncertainty weights) that gathers across
ranks, evaluates the active terms of a spec and returns {term: weighted value, ..., "total": sum}.

Distributed exactness (docs/losses.md, "Gathering"): for a fixed global batch, the loss value and the student
gradients after DDP's gradient averaging equal the 1-process result, for every term:
- global loss (rows = G): every rank evaluates the same global loss. With gather_with_grad the all-gather's
  backward sums every rank's gradient into the owner's rows (N × dL/ds_r); without it only the own slice is in the
  graph, so its gradient is multiplied by N in the backward (`views._GradScale`), which gives the same N × dL/ds_r.
- local loss (rows = local B, labels rank·B + arange(B)): rank r evaluates L_r, the global loss is mean_r L_r and
  the gathered columns need gather_with_grad for exact gradients (as in open_clip).
- `gd` is not separable over rows (its key gradients sum over all anchors), so it always uses the global rows.
- `feat` (intermediate tokens, never gathered) is computed on the local rows; in global mode its value is replaced
  by the mean over ranks (gradient unchanged, which is exactly N × dL/ds_r again).
Loss-side parameter gradients are exact per rank in every mode; training's engine averages them (`Engine.update`),
library users call `average_gradients_`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
import torch.nn as nn

from .. import distributed
from ..config import DistillConfig
from .features import resolve_feat_pairs
from .registry import REGISTRY, Shapes, all_params, needs, params_of, teacher_towers
from .spec import (
    EMB_METRICS,
    FeatPair,
    ResolvedSpec,
    SpecError,
    WeightSchedule,
    parse_member_values,
    parse_schedule,
    parse_spec,
    resolve_spec,
)
from .terms import SIGMOID_CHUNK
from .views import Views, as_list

COMPAT_RAW_SCALES = ("icl_logit_scale", "afd_logit_scale")  # --kd-compat clipkd: CLIP-KD's raw, unclamped multipliers


class DistillLoss(nn.Module):
    """Distillation loss zoo driven by a spec ("task=1,crd=1,icl=1,fd=2000").

    forward(student_image, student_text, student_scale, teacher_image, teacher_text, teacher_scale, step=0,
            student_intermediates=None, teacher_intermediates=None, student_image_masked=None) -> dict
    Student features raw (unnormalised), teacher features L2-normalised (a list per ensemble member allowed).
    """

    def __init__(self, spec, student_dim: int, teacher_dim: int | Sequence[int] | None = None, *,
                 local_loss: bool = False, gather_with_grad: bool = True, kd_temperature: float = 1.0,
                 teacher_logit_scale: float | None = None, student_kd_logit_scale: float | None = None,
                 mask_ratio: float = 0.5, feat_layers: Sequence[FeatPair] | None = None, emb_metric: str = "mse",
                 teacher_member: int | None = None, auto_balance: str = "none", compat: str = "none",
                 crd_soft_ce: bool = False, seed: int = 0, teacher_logit_scales: Sequence[float] | None = None,
                 teacher_logit_biases: Sequence[float] | None = None, sigmoid_chunk: int = SIGMOID_CHUNK,
                 student_logit_bias: bool = False):
        super().__init__()
        if isinstance(spec, ResolvedSpec):
            spec = spec.terms
        elif isinstance(spec, str):
            spec = parse_spec(spec)
        schedules = {}
        for name, value in dict(spec).items():
            if name not in REGISTRY:
                raise SpecError(f"unknown distillation term '{name}'")
            schedules[name] = value if isinstance(value, WeightSchedule) else parse_schedule(str(value), name)
        # terms with a constant weight of 0 do not exist at all (no parameters, never computed)
        self.schedules: dict[str, WeightSchedule] = {k: v for k, v in schedules.items() if v.active}
        if not self.schedules:
            raise SpecError("every term of the spec has weight 0: nothing to optimise")
        active = set(self.schedules)

        # ---- options ------------------------------------------------------------------------------------
        if compat not in ("none", "clipkd"):
            raise SpecError(f"unknown kd compat mode '{compat}' (none, clipkd)")
        if auto_balance not in ("none", "uncertainty"):
            raise SpecError(f"unknown kd auto-balance mode '{auto_balance}' (none, uncertainty)")
        if emb_metric not in EMB_METRICS:
            raise SpecError(f"unknown emb metric '{emb_metric}' ({', '.join(EMB_METRICS)})")
        if not kd_temperature > 0:
            raise SpecError(f"kd temperature must be > 0, got {kd_temperature}")
        for flag, v in (("teacher logit scale", teacher_logit_scale), ("student kd logit scale", student_kd_logit_scale)):
            if v is not None and not v > 0:
                raise SpecError(f"{flag} must be > 0, got {v}")
        if teacher_logit_scales is not None and teacher_logit_scale is not None:
            raise SpecError("give the teacher logit scale once: a fixed scale for every member, or one per member")
        for what, values in (("teacher logit scales", teacher_logit_scales),
                             ("teacher logit biases", teacher_logit_biases)):
            if values is not None and (not len(values) or not all(math.isfinite(float(x)) for x in values)):
                raise SpecError(f"{what} must be finite numbers, one per teacher member, got {values!r}")
        if teacher_logit_scales is not None and not all(float(x) > 0 for x in teacher_logit_scales):
            raise SpecError(f"teacher logit scales must be > 0, got {list(teacher_logit_scales)}")
        if int(sigmoid_chunk) < 1:
            raise SpecError(f"sigmoid chunk must be >= 1, got {sigmoid_chunk}")
        masked = [n for n in self.schedules if REGISTRY[n].masked_view]
        if masked and not 0.0 < mask_ratio < 1.0:
            raise SpecError(f"{masked[0]} needs 0 < mask ratio < 1, got {mask_ratio}")
        self.local_loss = bool(local_loss)
        self.gather_with_grad = bool(gather_with_grad)
        self.kd_temperature = float(kd_temperature)
        self.teacher_logit_scale = teacher_logit_scale
        self.student_kd_logit_scale = student_kd_logit_scale
        self.teacher_logit_scales = None if teacher_logit_scales is None else [float(x) for x in teacher_logit_scales]
        self.teacher_logit_biases = None if teacher_logit_biases is None else [float(x) for x in teacher_logit_biases]
        self.sigmoid_chunk = int(sigmoid_chunk)
        self.student_logit_bias = bool(student_logit_bias)
        self.emb_metric = emb_metric
        self.compat = compat
        self.auto_balance = auto_balance
        self.crd_soft_ce = bool(crd_soft_ce)
        self.mask_ratio = float(mask_ratio) if masked else 0.0

        # ---- dimensions -----------------------------------------------------------------------------------
        try:
            student_dim = operator.index(student_dim)
        except TypeError:
            student_dim = -1
        if student_dim <= 0:
            raise SpecError(f"student_dim must be a positive int, got {student_dim!r}")
        self.needs_teacher = needs(active, "teacher")
        self.needs_teacher_scale = needs(active, "teacher_scale")
        self.needs_teacher_bias = needs(active, "teacher_bias")
        self.needs_teacher_internals = needs(active, "teacher_internals")
        self.needs_intermediates = needs(active, "intermediates")
        self.teacher_towers = teacher_towers(active)  # the teacher embeddings read: all the live teacher computes
        self.student_dim = student_dim
        dims = [] if teacher_dim is None else [int(d) for d in as_list(teacher_dim)]
        if self.needs_teacher and (not dims or any(d <= 0 for d in dims)):
            raise SpecError(f"spec needs a teacher but teacher_dim is {teacher_dim!r}")
        self.teacher_dims = dims
        for what, values in (("teacher logit scales", self.teacher_logit_scales),
                             ("teacher logit biases", self.teacher_logit_biases)):
            if values is not None and dims and len(values) != len(dims):
                raise SpecError(f"{len(values)} {what} for {len(dims)} teacher(s): give one per member")
        if teacher_member is not None and not 0 <= teacher_member < max(len(dims), 1):
            raise SpecError(f"teacher member {teacher_member} out of range for {len(dims)} teacher(s)")
        self.teacher_member = teacher_member
        if not dims:
            d_t = student_dim
        elif teacher_member is not None:
            d_t = dims[teacher_member]
        else:
            d_t = sum(dims)  # ensemble feature terms: concatenation of the normalised members
        self.feature_teacher_dim = d_t

        self.feat_pairs: list[FeatPair] = []
        tokens = [n for n in self.schedules if REGISTRY[n].intermediates]
        if tokens:
            if not feat_layers or isinstance(feat_layers, str) or not all(isinstance(p, FeatPair) for p in feat_layers):
                raise SpecError(f"{tokens[0]} needs resolved layer pairs: pass feat_layers=training.distill.features."
                                "resolve_feat_pairs(student, teacher, spec) (create_distill_loss does it when given the "
                                "models)")
            self.feat_pairs = list(feat_layers)

        # ---- loss-side parameters (seeded: identical on every rank even before sync_()) -------------------
        shapes = Shapes(student_dim, d_t, self.feat_pairs, torch.Generator().manual_seed(int(seed)),
                        self.student_logit_bias)
        used = {p.name for p in params_of(active)}
        for param in all_params():  # every declared name exists (None when unused), in registry order
            setattr(self, param.name, param.build(shapes) if param.name in used else None)
        self._scale_names = [p.name for p in all_params() if p.scale]
        self.log_vars = (nn.ParameterDict({k: nn.Parameter(torch.zeros(())) for k in self.schedules})
                         if auto_balance == "uncertainty" else None)

    # ---- the trainer's interface ------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.schedules.items())

    def describe(self) -> str:
        """One line for the log: spec, loss mode and the options that change the math."""
        parts = [f"spec '{self.spec}'", "local loss" if self.local_loss else "global loss",
                 f"gather_with_grad={self.gather_with_grad}"]
        if any("kd_temperature" in REGISTRY[n].options for n in self.schedules):
            parts.append(f"tau={self.kd_temperature:g}")
        if self.teacher_logit_scale is not None:
            parts.append(f"teacher scale={self.teacher_logit_scale:g}")
        if self.student_kd_logit_scale is not None:
            parts.append(f"student kd scale={self.student_kd_logit_scale:g}")
        if self.teacher_logit_scales is not None:
            parts.append("teacher scales=" + "/".join(f"{x:g}" for x in self.teacher_logit_scales))
        if self.teacher_logit_biases is not None:
            parts.append("teacher biases=" + "/".join(f"{x:g}" for x in self.teacher_logit_biases))
        if any("sigmoid_chunk" in REGISTRY[n].options for n in self.schedules):
            owner = "the student's" if self.student_logit_bias else "loss-side"
            parts.append(f"sigmoid scale/bias: {owner}, chunk={self.sigmoid_chunk}")
        if len(self.teacher_dims) > 1:
            member = "concatenation" if self.teacher_member is None else f"member {self.teacher_member}"
            parts.append(f"{len(self.teacher_dims)} teachers (feature terms: {member})")
        if self.mask_ratio:
            parts.append(f"mask ratio={self.mask_ratio:g}")
        if self.feat_pairs:
            parts.append("feat pairs " + " ".join(f"{p.tower}:{p.student_layer}:{p.teacher_layer}"
                                                  for p in self.feat_pairs))
        if self.compat != "none":
            parts.append(f"compat={self.compat}")
        if self.auto_balance != "none":
            parts.append(f"auto-balance={self.auto_balance}")
        if self.crd_soft_ce:
            parts.append("crd as soft CE")
        n_params = sum(p.numel() for p in self.parameters())
        return ", ".join(parts) + f", {n_params} loss-side parameters"

    def extra_repr(self) -> str:
        return f"spec='{self.spec}', local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}"

    def schedule_weights(self, step: int) -> dict[str, float]:
        """Spec weight of every term at `step` (before auto-balancing)."""
        return {k: s(step) for k, s in self.schedules.items()}

    def effective_weights(self, step: int) -> dict[str, float]:
        """Multiplier of every term at `step`, auto-balancing (½·exp(−log_var)) included: log these."""
        weights = self.schedule_weights(step)
        if self.log_vars is not None:
            weights = {k: w * 0.5 * math.exp(-self.log_vars[k].item()) for k, w in weights.items()}
        return weights

    def feat_layers_for(self, role: str) -> dict[str, list[int]]:
        """Block indices the `feat` term needs from 'student' or 'teacher', per tower (sorted, unique): pass
        `layers=` these to models.towers.encode_*_with_options and the token lists, in this order, to forward()."""
        attr = {"student": "student_layer", "teacher": "teacher_layer"}[role]
        out: dict[str, list[int]] = {}
        for p in self.feat_pairs:
            out.setdefault(p.tower, [])
            if getattr(p, attr) not in out[p.tower]:
                out[p.tower].append(getattr(p, attr))
        return {k: sorted(v) for k, v in out.items()}

    def sync_(self) -> None:
        """Make every loss-side parameter identical on all ranks (call once after construction)."""
        distributed.broadcast_module_(self)

    def average_gradients_(self) -> None:
        """Average loss-side parameter gradients across ranks (call after backward, before the optimizer step)."""
        distributed.all_reduce_mean_([p.grad for p in self.parameters()])

    def no_weight_decay_names(self) -> set[str]:
        """Learnable scales, uncertainty log-variances, biases: excluded from weight decay."""
        no_decay = {*self._scale_names, "log_vars"}
        return {n for n, p in self.named_parameters() if n.split(".")[0] in no_decay or n.endswith("bias")}

    def param_groups(self, weight_decay: float) -> list[dict]:
        no_wd = self.no_weight_decay_names()
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n not in no_wd], "weight_decay": weight_decay},
                  {"params": [p for n, p in named if n in no_wd], "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def learned_scale(self, name: str) -> torch.Tensor:
        """Value of the learnable loss-side scale `<name>_logit_scale` ('icl' or 'afd', registry.py): exp(·) of its
        log-space parameter, which `clamp_scales_` keeps in [0, ln 100] after each step; the raw multiplier with
        compat."""
        param = getattr(self, f"{name}_logit_scale")
        return param if self.compat == "clipkd" else param.exp()

    @torch.no_grad()
    def clamp_scales_(self) -> None:
        """Clamp the learnable scales' parameters, as open_clip clamps logit_scale: clamping exp(p) in the forward
        instead would give p zero gradient outside the bounds, so a scale that crossed one would stay there."""
        for name in self._scale_names:
            param = getattr(self, name)
            if self.compat == "clipkd" and name in COMPAT_RAW_SCALES:
                continue
            if param is not None:
                param.clamp_(0.0, math.log(100.0))

    # ---- forward ----------------------------------------------------------------------------------------
    def forward(self, student_image: torch.Tensor, student_text: torch.Tensor, student_scale,
                teacher_image=None, teacher_text=None, teacher_scale=None, step: int = 0,
                student_intermediates: dict | None = None, teacher_intermediates: dict | None = None,
                student_image_masked: torch.Tensor | None = None, student_bias=None,
                teacher_bias=None) -> dict[str, torch.Tensor]:
        weights = {k: w for k, w in self.schedule_weights(step).items() if w != 0.0}
        ctx = Views(self, student_image, student_text, student_scale, teacher_image, teacher_text, teacher_scale,
                    student_image_masked, student_intermediates, teacher_intermediates, student_bias, teacher_bias)
        raw = {name: REGISTRY[name].fn(ctx) for name in weights}
        out: dict[str, torch.Tensor] = {}
        total = 0.0 * ctx.ls.sum() if isinstance(ctx.ls, torch.Tensor) and ctx.ls.requires_grad else 0.0
        reg = 0.0
        for name, value in raw.items():
            w = weights[name]
            if self.log_vars is not None:
                s = self.log_vars[name]
                out[name] = 0.5 * torch.exp(-s) * w * value
                reg = reg + 0.5 * s
            else:
                out[name] = w * value
            total = total + out[name]
        if self.log_vars is not None and raw:
            out["uncertainty_reg"] = reg
            total = total + reg
        if not isinstance(total, torch.Tensor) or not total.requires_grad:
            # nothing active at this step: zero, in the graph
            total = total + 0.0 * (ctx.s_v.sum() + (ctx.s_t.sum() if ctx.s_t is not None else 0.0))
        out["total"] = total
        return out


# ---- construction helpers ------------------------------------------------------------------------------------

def build_distill_loss(spec, student_dim: int, teacher_dim: int | Sequence[int] | None = None, **kwargs) -> DistillLoss:
    """DistillLoss from a spec string ("task=1,crd=1,icl=1,fd=2000"), a ResolvedSpec, or {term: weight};
    keyword options as DistillLoss. A ResolvedSpec's preset options fill options left unset."""
    if isinstance(spec, ResolvedSpec):
        for key, value in spec.options.items():
            if kwargs.get(key) is None:
                kwargs[key] = value
    return DistillLoss(spec, student_dim, teacher_dim, **kwargs)


def create_distill_loss(distill: DistillConfig, student_dim: int, teacher_dims: int | Sequence[int] | None, *,
                        seed: int, student_model: nn.Module | None = None,
                        teacher_model: nn.Module | Sequence[nn.Module] | None = None) -> DistillLoss:
    """DistillLoss from the distillation section. `student_model`/`teacher_model` (unwrapped open_clip models; a
    list for an ensemble) are needed by terms that take intermediate tokens (feat), to resolve layer widths; a
    `student_model` with a logit_bias (open_clip SigLIP) gives the sigmoid terms its own scale and bias.
    Explicit options win over the recipe's defaults."""
    spec = resolve_spec(distill.distill, distill.recipe, distill.overrides)
    opts = spec.options
    member = distill.kd_teacher_member
    kwargs = dict(
        local_loss=distill.local_loss,
        gather_with_grad=distill.gather_with_grad,
        kd_temperature=float(distill.kd_temperature),
        teacher_logit_scale=_first(distill.teacher_logit_scale, opts.get("teacher_logit_scale")),
        student_kd_logit_scale=_first(distill.student_kd_logit_scale, opts.get("student_kd_logit_scale")),
        mask_ratio=float(distill.mask_ratio),
        emb_metric=distill.emb_metric,
        teacher_member=member,
        auto_balance=distill.kd_auto_balance or "none",
        compat=distill.kd_compat or "none",
        crd_soft_ce=bool(opts.get("crd_soft_ce", False)),
        seed=int(seed or 0),
        teacher_logit_scales=parse_member_values(distill.teacher_logit_scales, "--teacher-logit-scales"),
        teacher_logit_biases=parse_member_values(distill.teacher_logit_biases, "--teacher-logit-biases"),
        sigmoid_chunk=int(distill.sigmoid_chunk),
        student_logit_bias=has_logit_bias(student_model),
    )
    if spec.needs("intermediates"):
        if student_model is None or teacher_model is None:
            names = ", ".join(n for n in spec.active if REGISTRY[n].intermediates)
            raise SpecError(f"{names} needs the student and teacher models to resolve layer widths "
                            "(create_distill_loss(..., student_model=, teacher_model=))")
        teachers = as_list(teacher_model)
        kwargs["feat_layers"] = resolve_feat_pairs(student_model, teachers[member or 0], distill.feat_layers)
    dims = teacher_dims
    if isinstance(dims, (list, tuple)) and len(dims) == 1:
        dims = dims[0]
    return DistillLoss(spec.terms, student_dim, dims, **kwargs)


def _first(*values):
    for v in values:
        if v is not None:
            return v
    return None


def has_logit_bias(model: nn.Module | None) -> bool:
    """Whether an open_clip model carries a learnable logit bias (SigLIP-style models do)."""
    return model is not None and getattr(model, "logit_bias", None) is not None

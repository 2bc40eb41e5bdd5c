"""`DistillLoss`: the loss-side nn.Module (projections, learnable scales, uncertainty weights) that gathers across
ranks, evaluates the active terms of a spec and returns {term: weighted value, ..., "total": sum}.

Distributed exactness (docs/losses.md, "Gathering"): for a fixed global batch, the loss value and the student
gradients after DDP's gradient averaging equal the 1-process result, for every term:
- global loss (rows = G): every rank evaluates the same global loss. With gather_with_grad the all-gather's
  backward sums every rank's gradient into the owner's rows (N × dL/ds_r); without it only the own slice is in the
  graph, so its gradient is multiplied by N in the backward (`_GradScale`), which gives the same N × dL/ds_r.
- local loss (rows = local B, labels rank·B + arange(B)): rank r evaluates L_r, the global loss is mean_r L_r and
  the gathered columns need gather_with_grad for exact gradients (as in open_clip).
- `gd` is not separable over rows (its key gradients sum over all anchors), so it always uses the global rows.
- `feat` (intermediate tokens, never gathered) is computed on the local rows; in global mode its value is replaced
  by the mean over ranks (gradient unchanged, which is exactly N × dL/ds_r again).
Loss-side parameter gradients are exact per rank in every mode; the trainer averages them (`average_gradients_`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
import torch.nn as nn

from .. import distributed
from . import terms as T
from .spec import (
    EMB_METRICS,
    TERMS,
    DistillSpecError,
    FeatPair,
    ResolvedSpec,
    WeightSchedule,
    parse_schedule,
    parse_spec,
    resolve_spec,
)

INIT_LOGIT_SCALE = math.log(1 / 0.07)  # 2.659260: log of CLIP's 1/0.07; CLIP-KD used this value as a raw multiplier
PROJECTED_TERMS = ("fd", "mfd", "icl", "xkd", "gd", "afd")  # use ŝ = normalize(P(s)) on both modalities


class _GradScale(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `factor` in the backward."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


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
                 crd_soft_ce: bool = False, seed: int = 0):
        super().__init__()
        if isinstance(spec, ResolvedSpec):
            spec = spec.terms
        elif isinstance(spec, str):
            spec = parse_spec(spec)
        schedules = {}
        for name, value in dict(spec).items():
            if name not in TERMS:
                raise DistillSpecError(f"unknown distillation term '{name}'")
            schedules[name] = value if isinstance(value, WeightSchedule) else parse_schedule(str(value), name)
        # terms with a constant weight of 0 do not exist at all (no parameters, never computed)
        self.schedules: dict[str, WeightSchedule] = {k: v for k, v in schedules.items() if v.active}
        if not self.schedules:
            raise DistillSpecError("every term of the spec has weight 0: nothing to optimise")
        active = set(self.schedules)

        # ---- options ------------------------------------------------------------------------------------
        if compat not in ("none", "clipkd"):
            raise DistillSpecError(f"unknown kd compat mode '{compat}' (none, clipkd)")
        if auto_balance not in ("none", "uncertainty"):
            raise DistillSpecError(f"unknown kd auto-balance mode '{auto_balance}' (none, uncertainty)")
        if emb_metric not in EMB_METRICS:
            raise DistillSpecError(f"unknown emb metric '{emb_metric}' ({', '.join(EMB_METRICS)})")
        if not kd_temperature > 0:
            raise DistillSpecError(f"kd temperature must be > 0, got {kd_temperature}")
        for flag, v in (("teacher logit scale", teacher_logit_scale), ("student kd logit scale", student_kd_logit_scale)):
            if v is not None and not v > 0:
                raise DistillSpecError(f"{flag} must be > 0, got {v}")
        if "mfd" in active and not 0.0 < mask_ratio < 1.0:
            raise DistillSpecError(f"mfd needs 0 < mask ratio < 1, got {mask_ratio}")
        self.local_loss = bool(local_loss)
        self.gather_with_grad = bool(gather_with_grad)
        self.kd_temperature = float(kd_temperature)
        self.teacher_logit_scale = teacher_logit_scale
        self.student_kd_logit_scale = student_kd_logit_scale
        self.emb_metric = emb_metric
        self.compat = compat
        self.auto_balance = auto_balance
        self.crd_soft_ce = bool(crd_soft_ce)
        self.mask_ratio = float(mask_ratio) if "mfd" in active else 0.0

        # ---- dimensions -----------------------------------------------------------------------------------
        try:
            student_dim = operator.index(student_dim)
        except TypeError:
            student_dim = -1
        if student_dim <= 0:
            raise DistillSpecError(f"student_dim must be a positive int, got {student_dim!r}")
        self.needs_teacher = bool(active - {"task"})
        self.needs_teacher_internals = "feat" in active
        self.needs_intermediates = "feat" in active
        self.student_dim = student_dim
        dims = [] if teacher_dim is None else [int(d) for d in _as_list(teacher_dim)]
        if self.needs_teacher and (not dims or any(d <= 0 for d in dims)):
            raise DistillSpecError(f"spec needs a teacher but teacher_dim is {teacher_dim!r}")
        self.teacher_dims = dims
        if teacher_member is not None and not 0 <= teacher_member < max(len(dims), 1):
            raise DistillSpecError(f"teacher member {teacher_member} out of range for {len(dims)} teacher(s)")
        self.teacher_member = teacher_member
        if not dims:
            d_t = student_dim
        elif teacher_member is not None:
            d_t = dims[teacher_member]
        else:
            d_t = sum(dims)  # ensemble feature terms: concatenation of the normalised members
        self.feature_teacher_dim = d_t

        # ---- loss-side parameters (seeded: identical on every rank even before sync_()) -------------------
        gen = torch.Generator().manual_seed(int(seed))
        uses_proj_v = bool(active & {*PROJECTED_TERMS, "emb"})
        uses_proj_t = bool(active & {*PROJECTED_TERMS, "emb_text"})
        self.proj_image = self._linear(student_dim, d_t, gen) if uses_proj_v and student_dim != d_t else None
        self.proj_text = self._linear(student_dim, d_t, gen) if uses_proj_t and student_dim != d_t else None
        self.icl_logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE)) if active & {"icl", "xkd"} else None
        if "afd" in active:
            self.afd_logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))
            self.afd_fuse_image = self._linear(2 * d_t, d_t, gen)
            self.afd_fuse_text = self._linear(2 * d_t, d_t, gen)
        else:
            self.afd_logit_scale = self.afd_fuse_image = self.afd_fuse_text = None
        self.feat_pairs: list[FeatPair] = []
        self.feat_proj = None
        if "feat" in active:
            if not feat_layers or isinstance(feat_layers, str) or not all(isinstance(p, FeatPair) for p in feat_layers):
                raise DistillSpecError(
                    "feat needs resolved layer pairs: pass feat_layers=training.distill.features.resolve_feat_pairs("
                    "student, teacher, spec) (distill_loss_from_args does it when given the models)")
            self.feat_pairs = list(feat_layers)
            self.feat_proj = nn.ModuleList(self._linear(p.student_width, p.teacher_width, gen) for p in self.feat_pairs)
        self.log_vars = (nn.ParameterDict({k: nn.Parameter(torch.zeros(())) for k in self.schedules})
                         if auto_balance == "uncertainty" else None)

    @staticmethod
    def _linear(d_in: int, d_out: int, gen: torch.Generator) -> nn.Linear:
        layer = nn.Linear(d_in, d_out)
        bound = 1.0 / math.sqrt(d_in)  # nn.Linear's default init, drawn from our own generator
        with torch.no_grad():
            layer.weight.uniform_(-bound, bound, generator=gen)
            layer.bias.uniform_(-bound, bound, generator=gen)
        return layer

    # ---- the trainer's interface ------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.schedules.items())

    def describe(self) -> str:
        """One line for the log: spec, loss mode and the options that change the math."""
        parts = [f"spec '{self.spec}'", "local loss" if self.local_loss else "global loss",
                 f"gather_with_grad={self.gather_with_grad}"]
        if set(self.schedules) & {"crd", "xkd"}:
            parts.append(f"tau={self.kd_temperature:g}")
        if self.teacher_logit_scale is not None:
            parts.append(f"teacher scale={self.teacher_logit_scale:g}")
        if self.student_kd_logit_scale is not None:
            parts.append(f"student kd scale={self.student_kd_logit_scale:g}")
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
        `layers=` these to features.encode_*_with_options and the token lists, in this order, to forward()."""
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
        return {n for n, p in self.named_parameters() if p.ndim < 2 or n.endswith("bias")}

    def param_groups(self, weight_decay: float) -> list[dict]:
        no_wd = self.no_weight_decay_names()
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n not in no_wd], "weight_decay": weight_decay},
                  {"params": [p for n, p in named if n in no_wd], "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def learned_scale(self, name: str) -> torch.Tensor:
        """Value of a learnable loss-side scale ('icl' or 'afd'): exp(·) of its log-space parameter, which
        `clamp_scales_` keeps in [0, ln 100] after each step; the raw multiplier with compat."""
        param = {"icl": self.icl_logit_scale, "afd": self.afd_logit_scale}[name]
        return param if self.compat == "clipkd" else param.exp()

    @torch.no_grad()
    def clamp_scales_(self) -> None:
        """Clamp the learnable scales' parameters, as open_clip clamps logit_scale: clamping exp(p) in the forward
        instead would give p zero gradient outside the bounds, so a scale that crossed one would stay there."""
        if self.compat == "clipkd":
            return
        for param in (self.icl_logit_scale, getattr(self, "afd_logit_scale", None)):
            if param is not None:
                param.clamp_(0.0, math.log(100.0))

    # ---- forward ----------------------------------------------------------------------------------------
    def forward(self, student_image: torch.Tensor, student_text: torch.Tensor, student_scale,
                teacher_image=None, teacher_text=None, teacher_scale=None, step: int = 0,
                student_intermediates: dict | None = None, teacher_intermediates: dict | None = None,
                student_image_masked: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        weights = {k: w for k, w in self.schedule_weights(step).items() if w != 0.0}
        ctx = _Context(self, student_image, student_text, student_scale, teacher_image, teacher_text,
                       teacher_scale, student_image_masked)
        raw: dict[str, torch.Tensor] = {}
        for name in weights:
            if name == "feat":
                raw[name] = self._feat(ctx, student_intermediates, teacher_intermediates)
            else:
                raw[name] = getattr(ctx, "term_" + name)()
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
            total = total + 0.0 * (ctx.s_v.sum() + ctx.s_t.sum())  # nothing active at this step: zero, in the graph
        out["total"] = total
        return out

    def _feat(self, ctx: _Context, student_intermediates, teacher_intermediates) -> torch.Tensor:
        if student_intermediates is None or teacher_intermediates is None:
            raise ValueError("feat is active: pass student_intermediates and teacher_intermediates "
                             "({tower: [tokens per layer of loss_fn.feat_layers_for(role)[tower]]})")
        s_layers, t_layers = self.feat_layers_for("student"), self.feat_layers_for("teacher")
        s_tok, t_tok, ws, bs = [], [], [], []
        for pair, proj in zip(self.feat_pairs, self.feat_proj):
            s_list, t_list = student_intermediates[pair.tower], teacher_intermediates[pair.tower]
            if len(s_list) != len(s_layers[pair.tower]) or len(t_list) != len(t_layers[pair.tower]):
                raise ValueError(f"feat: expected {len(s_layers[pair.tower])} student and {len(t_layers[pair.tower])} "
                                 f"teacher {pair.tower} token tensors (loss_fn.feat_layers_for)")
            s = s_list[s_layers[pair.tower].index(pair.student_layer)]
            t = t_list[t_layers[pair.tower].index(pair.teacher_layer)]
            s_tok.append(_upcast(_tokens(s)))
            t_tok.append(_upcast(_tokens(t).detach()))
            ws.append(proj.weight)
            bs.append(proj.bias)
        value = T.feat(s_tok, t_tok, ws, bs)
        if not self.local_loss and ctx.world > 1:  # global mode: report the global mean (gradient unchanged)
            mean = distributed.reduce_sum(value.detach()) / ctx.world
            value = value + (mean - value.detach())
        return value


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half/bfloat16 features (autocast) are evaluated in float32; float32/float64 are kept."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] feature maps -> [B, H·W, C] tokens; [B, N, C] unchanged."""
    return x.flatten(2).transpose(1, 2) if x.ndim == 4 else x


class _Context:
    """Per-call lazy views: each gathered / normalised / projected tensor is computed on first use only, so a
    term that is off at this step costs nothing (no gather, no projection)."""

    def __init__(self, loss: DistillLoss, s_v, s_t, ls, t_v, t_t, lt, s_v_masked):
        self.loss = loss
        self.rank, self.world = distributed.world_info()
        self.s_v, self.s_t = _upcast(s_v), _upcast(s_t)
        self.s_vm = _upcast(s_v_masked) if s_v_masked is not None else None
        self.ls = _upcast(ls) if isinstance(ls, torch.Tensor) else ls
        dtype = self.s_v.dtype
        self.batch = s_v.shape[0]
        self.device = s_v.device
        self._cache: dict = {}
        self.t_v = [x.detach().to(dtype) for x in _as_list(t_v)] if t_v is not None else None
        self.t_t = [x.detach().to(dtype) for x in _as_list(t_t)] if t_t is not None else None
        if loss.needs_teacher and (self.t_v is None or self.t_t is None):
            raise ValueError(f"spec '{loss.spec}' needs teacher_image and teacher_text")
        if self.t_v is not None:
            k = len(self.t_v)
            if len(self.t_t) != k or len(loss.teacher_dims) not in (0, k):
                raise ValueError(f"teacher ensemble: {len(self.t_v)} image, {len(self.t_t)} text feature tensors "
                                 f"for {len(loss.teacher_dims)} teacher(s)")
            dims = loss.teacher_dims or [x.shape[-1] for x in self.t_v]
            if [x.shape[-1] for x in self.t_v] != dims or [x.shape[-1] for x in self.t_t] != dims:
                raise ValueError(f"teacher feature widths {[x.shape[-1] for x in self.t_v]} do not match "
                                 f"teacher_dim {dims}")
            if loss.teacher_logit_scale is not None:
                self.lt = [torch.tensor(float(loss.teacher_logit_scale), dtype=dtype, device=self.device)] * k
            elif lt is None:
                if set(loss.schedules) & {"crd", "xkd", "gd"}:
                    raise ValueError(f"spec '{loss.spec}' needs teacher_scale (or teacher_logit_scale=...)")
                self.lt = None
            else:
                scales = [torch.as_tensor(x, device=self.device).detach().to(dtype) for x in _as_list(lt)]
                self.lt = scales * k if len(scales) == 1 else scales
        self.s_kd = (loss.student_kd_logit_scale if loss.student_kd_logit_scale is not None else self.ls)

    def _get(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    # "rows" (anchors), "cols" (keys), "all" (global rows, for gd) -> canonical source of the rows
    def _canon(self, view: str) -> tuple:
        loss = self.loss
        if self.world == 1:
            return ("local",)
        if view == "rows" and loss.local_loss:
            return ("local",)
        if view == "cols" and loss.local_loss:
            return ("gathered", False)
        return ("gathered", not loss.gather_with_grad)  # global rows: scale the own-slice gradient by N

    def _mod(self, mod: str) -> str:
        return "v" if mod == "vm" and self.s_vm is None else mod  # mfd on the (already masked) student_image

    def _student_raw(self, mod: str, view: str) -> torch.Tensor:
        mod = self._mod(mod)
        canon = self._canon(view)
        local = {"v": self.s_v, "t": self.s_t, "vm": self.s_vm}[mod]
        if canon[0] == "local":
            return local

        def gather():
            x = _GradScale.apply(local, self.world) if canon[1] else local
            return distributed.all_gather_cat(x, with_grad=self.loss.gather_with_grad)
        return self._get(("s_raw", mod, canon), gather)

    def n(self, mod: str, view: str) -> torch.Tensor:
        mod = self._mod(mod)
        return self._get(("n", mod, self._canon(view)), lambda: T.normalize(self._student_raw(mod, view)))

    def praw(self, mod: str, view: str) -> torch.Tensor:
        mod = self._mod(mod)
        proj = self.loss.proj_text if mod == "t" else self.loss.proj_image

        def compute():
            x = self._student_raw(mod, view)
            return proj(x) if proj is not None else x
        return self._get(("praw", mod, self._canon(view)), compute)

    def p(self, mod: str, view: str) -> torch.Tensor:
        mod = self._mod(mod)
        return self._get(("p", mod, self._canon(view)), lambda: T.normalize(self.praw(mod, view)))

    def _teacher_members(self, mod: str, view: str) -> list[torch.Tensor]:
        canon = self._canon(view)[0]
        local = self.t_v if mod == "v" else self.t_t

        def compute():
            out = [T.normalize(x) for x in local]
            if canon == "gathered":
                out = [distributed.all_gather_cat(x, with_grad=False).detach() for x in out]
            return out
        return self._get(("t", mod, canon), compute)

    def tf(self, mod: str, view: str) -> torch.Tensor:
        """Feature-level teacher: the chosen member, the only member, or the renormalised concatenation."""
        members = self._teacher_members(mod, view)
        m = self.loss.teacher_member
        if m is not None:
            return members[m]
        if len(members) == 1:
            return members[0]
        return self._get(("tf", mod, self._canon(view)[0]), lambda: T.normalize(torch.cat(members, dim=-1)))

    def tf_scale(self):
        m = self.loss.teacher_member
        if m is not None or len(self.lt) == 1:
            return self.lt[m or 0]
        return torch.stack(self.lt).mean()

    def labels(self) -> torch.Tensor:
        def compute():
            if self.loss.local_loss and self.world > 1:
                return self.rank * self.batch + torch.arange(self.batch, device=self.device)
            return torch.arange(self.batch * self.world, device=self.device)
        return self._get("labels", compute)

    def targets(self):
        tau = self.loss.kd_temperature
        return self._get("targets", lambda: T.teacher_targets(
            self._teacher_members("v", "rows"), self._teacher_members("t", "rows"),
            self._teacher_members("v", "cols"), self._teacher_members("t", "cols"), self.lt, tau))

    # ---- one method per term -------------------------------------------------------------------------------
    def term_task(self):
        return T.task(self.n("v", "rows"), self.n("t", "rows"), self.n("v", "cols"), self.n("t", "cols"),
                      self.ls, self.labels())

    def term_crd(self):
        p_i2t, p_t2i = self.targets()
        return T.crd(self.n("v", "rows"), self.n("t", "rows"), self.n("v", "cols"), self.n("t", "cols"),
                     self.s_kd, p_i2t, p_t2i, self.loss.kd_temperature, self.loss.crd_soft_ce)

    def term_fd(self):
        return T.fd(self.p("v", "rows"), self.p("t", "rows"), self.tf("v", "rows"), self.tf("t", "rows"))

    def term_mfd(self):
        return T.fd(self.p("vm", "rows"), self.p("t", "rows"), self.tf("v", "rows"), self.tf("t", "rows"))

    def term_icl(self):
        return T.icl(self.p("v", "rows"), self.p("t", "rows"), self.tf("v", "cols"), self.tf("t", "cols"),
                     self.loss.learned_scale("icl"), self.labels())

    def term_xkd(self):
        p_i2t, p_t2i = self.targets()
        return T.xkd(self.p("v", "rows"), self.p("t", "rows"), self.tf("v", "cols"), self.tf("t", "cols"),
                     self.loss.learned_scale("icl"), p_i2t, p_t2i, self.loss.kd_temperature)

    def term_gd(self):
        return T.gd(self.p("v", "all"), self.p("t", "all"), self.s_kd, self.tf("v", "all"), self.tf("t", "all"),
                    self.tf_scale())

    def _afd_fused(self, mod: str, view: str):
        fuse = self.loss.afd_fuse_image if mod == "v" else self.loss.afd_fuse_text
        return self._get(("afd", mod, self._canon(view)),
                         lambda: T.afd_fuse(self.p(mod, view), self.tf(mod, view), fuse.weight, fuse.bias))

    def term_afd(self):
        return T.afd(self._afd_fused("v", "rows"), self._afd_fused("t", "rows"), self._afd_fused("v", "cols"),
                     self._afd_fused("t", "cols"), self.loss.learned_scale("afd"), self.labels())

    def _sim_args(self):
        return (self.n("v", "rows"), self.n("t", "rows"), self.n("v", "cols"), self.n("t", "cols"),
                self.tf("v", "rows"), self.tf("t", "rows"), self.tf("v", "cols"), self.tf("t", "cols"))

    def term_sim(self):
        return T.sim(*self._sim_args())

    def term_sim_inter(self):
        a = self._sim_args()
        return T.sim_inter(a[0], a[3], a[4], a[7])

    def term_sim_intra(self):
        return T.sim_intra(*self._sim_args())

    def term_emb(self):
        return T.emb(self.praw("v", "rows"), self.tf("v", "rows"), self.loss.emb_metric)

    def term_emb_text(self):
        return T.emb(self.praw("t", "rows"), self.tf("t", "rows"), self.loss.emb_metric)


# ---- construction helpers ------------------------------------------------------------------------------------

def build_distill_loss(spec, student_dim: int, teacher_dim: int | Sequence[int] | None = None, **kwargs) -> DistillLoss:
    """DistillLoss from a spec string ("task=1,crd=1,icl=1,fd=2000"), a ResolvedSpec, or {term: weight};
    keyword options as DistillLoss. A ResolvedSpec's preset options fill options left unset."""
    if isinstance(spec, ResolvedSpec):
        for key, value in spec.options.items():
            if kwargs.get(key) is None:
                kwargs[key] = value
    return DistillLoss(spec, student_dim, teacher_dim, **kwargs)


def distill_loss_from_args(args, student_dim: int, teacher_dims: int | Sequence[int] | None,
                           student_model: nn.Module | None = None,
                           teacher_model: nn.Module | Sequence[nn.Module] | None = None) -> DistillLoss:
    """DistillLoss from the parsed CLI flags (params.py). `student_model`/`teacher_model` (unwrapped open_clip
    models; a list for an ensemble) are needed only when `feat` is active, to resolve layer widths."""
    spec = resolve_spec(getattr(args, "distill", None), getattr(args, "recipe", None),
                        getattr(args, "distill_overrides", None))
    opts = dict(spec.options)
    member = getattr(args, "kd_teacher_member", None)
    kwargs = dict(
        local_loss=bool(getattr(args, "local_loss", False)),
        gather_with_grad=bool(getattr(args, "gather_with_grad", False)),
        kd_temperature=float(getattr(args, "kd_temperature", 1.0)),
        teacher_logit_scale=_first(getattr(args, "teacher_logit_scale", None), opts.get("teacher_logit_scale")),
        student_kd_logit_scale=_first(getattr(args, "student_kd_logit_scale", None),
                                      opts.get("student_kd_logit_scale")),
        mask_ratio=float(getattr(args, "mask_ratio", 0.5)),
        emb_metric=getattr(args, "emb_metric", "mse"),
        teacher_member=member,
        auto_balance=getattr(args, "kd_auto_balance", "none") or "none",
        compat=getattr(args, "kd_compat", "none") or "none",
        crd_soft_ce=bool(opts.get("crd_soft_ce", False)),
        seed=int(getattr(args, "seed", 0) or 0),
    )
    active = {k for k, s in spec.terms.items() if s.active}
    if "feat" in active:
        if student_model is None or teacher_model is None:
            raise DistillSpecError("feat needs the student and teacher models to resolve layer widths "
                                   "(distill_loss_from_args(..., student_model=, teacher_model=))")
        from .features import resolve_feat_pairs

        teachers = _as_list(teacher_model)
        kwargs["feat_layers"] = resolve_feat_pairs(student_model, teachers[member or 0],
                                                   getattr(args, "feat_layers", None))
    dims = teacher_dims
    if isinstance(dims, (list, tuple)) and len(dims) == 1:
        dims = dims[0]
    return DistillLoss(spec.terms, student_dim, dims, **kwargs)


def _first(*values):
    for v in values:
        if v is not None:
            return v
    return None

"""`Views`: what a term function reads, computed lazily per loss call.

Each gathered / normalised / projected tensor is computed on first use only, so a term that is off at this step
costs nothing (no gather, no projection). Views are named by modality ("v" image, "t" text, "vm" the masked image)
and role: "rows" (anchors), "cols" (keys), "all" (global rows, for gd); see loss.py for the distributed exactness.
"""

from __future__ import annotations

import torch

from .. import distributed
from . import terms as T


class _GradScale(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `factor` in the backward."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half/bfloat16 features (autocast) are evaluated in float32; float32/float64 are kept."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] feature maps -> [B, H·W, C] tokens; [B, N, C] unchanged."""
    return x.flatten(2).transpose(1, 2) if x.ndim == 4 else x


class Views:
    """The inputs of one loss call, as the term functions read them (see the module docstring)."""

    def __init__(self, loss, s_v, s_t, ls, t_v, t_t, lt, s_v_masked, student_intermediates=None,
                 teacher_intermediates=None, s_bias=None, t_bias=None):
        self.loss = loss
        self.student_intermediates, self.teacher_intermediates = student_intermediates, teacher_intermediates
        self.rank, self.world = distributed.world_info()
        self.s_v, self.s_t = upcast(s_v), (upcast(s_t) if s_t is not None else None)  # None: image-only student
        self.s_vm = upcast(s_v_masked) if s_v_masked is not None else None
        self.ls = upcast(ls) if isinstance(ls, torch.Tensor) else ls
        self.s_bias = upcast(s_bias) if isinstance(s_bias, torch.Tensor) else s_bias
        dtype = self.s_v.dtype
        self.batch = s_v.shape[0]
        self.device = s_v.device
        self._cache: dict = {}
        self.t_v = [x.detach().to(dtype) for x in as_list(t_v)] if t_v is not None else None
        self.t_t = [x.detach().to(dtype) for x in as_list(t_t)] if t_t is not None else None
        # the teacher embeddings the active terms read (a live teacher computes only those: loss.teacher_towers)
        wanted = {"image": self.t_v, "text": self.t_t}
        missing = [tower for tower in sorted(loss.teacher_towers) if wanted[tower] is None]
        if loss.needs_teacher and missing:
            raise ValueError(f"spec '{loss.spec}' needs teacher_{' and teacher_'.join(missing)}")
        given = [x for x in (self.t_v, self.t_t) if x is not None]
        self.lt, self.lb = None, []
        if given:
            k = len(given[0])
            if any(len(x) != k for x in given) or len(loss.teacher_dims) not in (0, k):
                raise ValueError(f"teacher ensemble: {[len(x) for x in given]} image/text feature tensors "
                                 f"for {len(loss.teacher_dims)} teacher(s)")
            dims = loss.teacher_dims or [x.shape[-1] for x in given[0]]
            if any([x.shape[-1] for x in features] != dims for features in given):
                raise ValueError(f"teacher feature widths {[x.shape[-1] for x in given[0]]} do not match "
                                 f"teacher_dim {dims}")
            if loss.teacher_logit_scales is not None:  # per member (MobileCLIP2's 70/60)
                if len(loss.teacher_logit_scales) != k:
                    raise ValueError(f"teacher_logit_scales has {len(loss.teacher_logit_scales)} entries for "
                                     f"{k} teacher(s)")
                self.lt = [torch.tensor(float(x), dtype=dtype, device=self.device) for x in loss.teacher_logit_scales]
            elif loss.teacher_logit_scale is not None:
                self.lt = [torch.tensor(float(loss.teacher_logit_scale), dtype=dtype, device=self.device)] * k
            elif lt is None:
                if loss.needs_teacher_scale:
                    raise ValueError(f"spec '{loss.spec}' needs teacher_scale (or teacher_logit_scale=...)")
                self.lt = None
            else:
                scales = [torch.as_tensor(x, device=self.device).detach().to(dtype) for x in as_list(lt)]
                self.lt = scales * k if len(scales) == 1 else scales
            self.lb = self._teacher_bias_values(t_bias, k, dtype)
        self.s_kd = (loss.student_kd_logit_scale if loss.student_kd_logit_scale is not None else self.ls)

    def _teacher_bias_values(self, t_bias, k: int, dtype) -> list:
        """Per member: the option's bias, else the teacher's own (None for a member without one)."""
        fixed = self.loss.teacher_logit_biases
        if fixed is not None:
            if len(fixed) != k:
                raise ValueError(f"teacher_logit_biases has {len(fixed)} entries for {k} teacher(s)")
            return [torch.tensor(float(x), dtype=dtype, device=self.device) for x in fixed]
        given = as_list(t_bias) if t_bias is not None else [None]
        given = given * k if len(given) == 1 else given
        if len(given) != k:
            raise ValueError(f"teacher_bias has {len(given)} entries for {k} teacher(s)")
        return [None if b is None else torch.as_tensor(b, device=self.device).detach().to(dtype) for b in given]

    def student_sigmoid(self):
        """(scale, bias) of the student's sigmoid logits: a SigLIP student's own, else the loss-side parameters."""
        loss = self.loss
        if loss.siglip_logit_scale is not None:
            if self.s_bias is not None:
                raise ValueError("student_bias was passed to a loss built for a student without a logit bias "
                                 "(student_logit_bias=False): its sigmoid terms use loss-side siglip_logit_scale/"
                                 "siglip_logit_bias")
            return loss.siglip_logit_scale.exp(), loss.siglip_logit_bias
        if self.s_bias is None:
            raise ValueError("the loss was built for a student with its own logit bias (student_logit_bias=True): "
                             "pass student_bias")
        return self.ls, self.s_bias

    def teacher_biases(self) -> list:
        missing = [m for m, b in enumerate(self.lb) if b is None]
        if missing:
            raise ValueError(f"spec '{self.loss.spec}' needs the teacher's logit bias: teacher member(s) {missing} "
                             "have none (pass teacher_bias, or teacher_logit_biases=...)")
        return self.lb

    def cached(self, key, fn):
        """`fn()`, computed once per loss call under `key` (terms share their derived tensors this way)."""
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    # "rows" (anchors), "cols" (keys), "all" (global rows, for gd) -> canonical source of the rows
    def canon(self, view: str) -> tuple:
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
        canon = self.canon(view)
        local = {"v": self.s_v, "t": self.s_t, "vm": self.s_vm}[mod]
        if local is None:
            raise ValueError(f"spec '{self.loss.spec}' reads the student's {'text' if mod == 't' else 'masked image'} "
                             "features, which this student does not give (image-only students train on emb)")
        if canon[0] == "local":
            return local

        def gather():
            x = _GradScale.apply(local, self.world) if canon[1] else local
            return distributed.all_gather_cat(x, with_grad=self.loss.gather_with_grad)
        return self.cached(("s_raw", mod, canon), gather)

    def n(self, mod: str, view: str) -> torch.Tensor:
        mod = self._mod(mod)
        return self.cached(("n", mod, self.canon(view)), lambda: T.normalize(self._student_raw(mod, view)))

    def praw(self, mod: str, view: str) -> torch.Tensor:
        mod = self._mod(mod)
        proj = self.loss.proj_text if mod == "t" else self.loss.proj_image

        def compute():
            x = self._student_raw(mod, view)
            return proj(x) if proj is not None else x
        return self.cached(("praw", mod, self.canon(view)), compute)

    def p(self, mod: str, view: str) -> torch.Tensor:
        mod = self._mod(mod)
        return self.cached(("p", mod, self.canon(view)), lambda: T.normalize(self.praw(mod, view)))

    def teacher_members(self, mod: str, view: str) -> list[torch.Tensor]:
        """Each ensemble member's normalised teacher features (gathered for "cols"/global rows)."""
        return self._teacher_members(mod, view)

    def _teacher_members(self, mod: str, view: str) -> list[torch.Tensor]:
        canon = self.canon(view)[0]
        local = self.t_v if mod == "v" else self.t_t

        def compute():
            out = [T.normalize(x) for x in local]
            if canon == "gathered":
                out = [distributed.all_gather_cat(x, with_grad=False).detach() for x in out]
            return out
        return self.cached(("t", mod, canon), compute)

    def tf(self, mod: str, view: str) -> torch.Tensor:
        """Feature-level teacher: the chosen member, the only member, or the renormalised concatenation."""
        members = self._teacher_members(mod, view)
        m = self.loss.teacher_member
        if m is not None:
            return members[m]
        if len(members) == 1:
            return members[0]
        return self.cached(("tf", mod, self.canon(view)[0]), lambda: T.normalize(torch.cat(members, dim=-1)))

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
        return self.cached("labels", compute)

    def targets(self):
        tau = self.loss.kd_temperature
        return self.cached("targets", lambda: T.teacher_targets(
            self._teacher_members("v", "rows"), self._teacher_members("t", "rows"),
            self._teacher_members("v", "cols"), self._teacher_members("t", "cols"), self.lt, tau))

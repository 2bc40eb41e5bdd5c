"""The term registry: every distillation term, registered once with what it needs, its parameters and its function.

A new loss is one function plus one registration (add its math to terms.py and docs/losses.md):

    @register("my_term", "one-line description", params=(PROJ_IMAGE, PROJ_TEXT))
    def my_term(v: Views) -> Tensor:
        return T.my_math(v.p("v", "rows"), v.tf("v", "rows"))

`Views` (views.py) hands the function the gathered / normalised / projected features it asks for, computed on
first use. What a registration declares:
- `teacher`: the term reads teacher outputs (a run without --teacher refuses it);
- `teacher_scale`: it reads the teacher's logit scale (or --teacher-logit-scale);
- `teacher_bias`: it reads the teacher's logit bias (a SigLIP teacher's, or --teacher-logit-biases);
- `teacher_towers`: the teacher embeddings it reads ("image", "text"; default both): the live teacher runs only the
  towers some active term reads (`teacher_towers(names)`);
- `teacher_internals`: it needs a live teacher's internals (a teacher-embedding cache cannot serve it);
- `intermediates`: both models return the tokens of the resolved `feat_layers` pairs from their one forward;
- `masked_view`: the student's image forward is masked (--mask-ratio); only ViT students can;
- `params`: loss-side parameters (`Param`), shared by name between terms and created once in registry order;
- `options`: the DistillLoss options that change its value (for the log line).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import distributed
from . import terms as T
from .views import Views, tokens, upcast

INIT_LOGIT_SCALE = math.log(1 / 0.07)  # 2.659260: log of CLIP's 1/0.07; CLIP-KD used this value as a raw multiplier
SIGLIP_INIT_LOGIT_SCALE, SIGLIP_INIT_LOGIT_BIAS = math.log(10.0), -10.0  # SigLIP (Zhai et al. 2023): t' = log 10, b = -10


@dataclass(frozen=True)
class Shapes:
    """What a parameter is built from: the widths and the seeded generator (the same draws on every rank)."""

    student_dim: int
    teacher_dim: int  # the feature-level teacher: one member, or the concatenation of an ensemble
    feat_pairs: list
    generator: torch.Generator
    student_logit_bias: bool = False  # the student model has its own sigmoid scale and bias (an open_clip SigLIP)

    def linear(self, d_in: int, d_out: int) -> nn.Linear:
        layer = nn.Linear(d_in, d_out)
        bound = 1.0 / math.sqrt(d_in)  # nn.Linear's default init, drawn from our own generator
        with torch.no_grad():
            layer.weight.uniform_(-bound, bound, generator=self.generator)
            layer.bias.uniform_(-bound, bound, generator=self.generator)
        return layer


@dataclass(frozen=True)
class Param:
    """A loss-side parameter: the DistillLoss attribute (and state_dict key) `name`, built by `build` (None: not
    needed for these widths). A `scale` is a learnable log-space logit scale: no weight decay, clamped to
    [0, ln 100] after each step; other parameters are modules whose biases skip weight decay."""

    name: str
    build: Callable[[Shapes], nn.Module | nn.Parameter | None]
    scale: bool = False


def _scale(_: Shapes) -> nn.Parameter:
    return nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))


def _projection(s: Shapes) -> nn.Linear | None:
    return s.linear(s.student_dim, s.teacher_dim) if s.student_dim != s.teacher_dim else None


# ŝ = normalize(P(s)): student embeddings projected to the teacher width (no projection when the widths agree)
PROJ_IMAGE = Param("proj_image", _projection)
PROJ_TEXT = Param("proj_text", _projection)
ICL_SCALE = Param("icl_logit_scale", _scale, scale=True)  # shared by icl and xkd
AFD_SCALE = Param("afd_logit_scale", _scale, scale=True)
AFD_FUSE_IMAGE = Param("afd_fuse_image", lambda s: s.linear(2 * s.teacher_dim, s.teacher_dim))
AFD_FUSE_TEXT = Param("afd_fuse_text", lambda s: s.linear(2 * s.teacher_dim, s.teacher_dim))
# the sigmoid terms' student scale (log space) and bias, for a student without its own: SigLIP's init
SIGLIP_SCALE = Param("siglip_logit_scale", lambda s: None if s.student_logit_bias else
                     nn.Parameter(torch.tensor(SIGLIP_INIT_LOGIT_SCALE)), scale=True)
SIGLIP_BIAS = Param("siglip_logit_bias", lambda s: None if s.student_logit_bias else
                    nn.Parameter(torch.tensor(SIGLIP_INIT_LOGIT_BIAS)))
FEAT_PROJ = Param("feat_proj", lambda s: nn.ModuleList(s.linear(p.student_width, p.teacher_width)
                                                       for p in s.feat_pairs))


@dataclass(frozen=True)
class Term:
    name: str
    description: str
    fn: Callable[[Views], torch.Tensor]
    teacher: bool = True
    teacher_scale: bool = False
    teacher_bias: bool = False
    teacher_towers: tuple[str, ...] = ("image", "text")
    teacher_internals: bool = False
    intermediates: bool = False
    masked_view: bool = False
    params: tuple[Param, ...] = ()
    options: tuple[str, ...] = ()


REGISTRY: dict[str, Term] = {}  # in registration order: the order of the loss-side parameters and of VALID_TERMS


def register(name: str, description: str, **needs) -> Callable:
    """Decorator: register `fn(views) -> unweighted loss` as the term `name` (see the module docstring)."""
    def add(fn: Callable[[Views], torch.Tensor]) -> Callable[[Views], torch.Tensor]:
        if name in REGISTRY:
            raise ValueError(f"distillation term '{name}' is registered twice")
        REGISTRY[name] = Term(name, description, fn, **needs)
        return fn
    return add


def params_of(names) -> list[Param]:
    """The parameters these terms use, each once, in registry order (the state_dict and optimizer order)."""
    out: dict[str, Param] = {}
    for term in REGISTRY.values():
        if term.name in names:
            for param in term.params:
                out.setdefault(param.name, param)
    return list(out.values())


def all_params() -> list[Param]:
    return params_of(REGISTRY)


def needs(names, what: str) -> bool:
    """Whether any of these terms declares `what` (e.g. "teacher", "intermediates", "teacher_internals")."""
    return any(getattr(REGISTRY[n], what) for n in names if n in REGISTRY)


def teacher_towers(names) -> frozenset[str]:
    """The teacher embeddings ("image", "text") that these terms read: what the live teacher computes."""
    return frozenset(t for n in names if n in REGISTRY and REGISTRY[n].teacher for t in REGISTRY[n].teacher_towers)


# ---- the terms (math: terms.py, docs/losses.md) ------------------------------------------------------------------

@register("task", "CLIP InfoNCE of the student on ground-truth pairs", teacher=False)
def task(v: Views):
    return T.task(v.n("v", "rows"), v.n("t", "rows"), v.n("v", "cols"), v.n("t", "cols"), v.ls, v.labels())


@register("crd", "contrastive relational distillation: KL between teacher and student image-text softmaxes",
          teacher_scale=True, options=("kd_temperature",))
def crd(v: Views):
    p_i2t, p_t2i = v.targets()
    return T.crd(v.n("v", "rows"), v.n("t", "rows"), v.n("v", "cols"), v.n("t", "cols"), v.s_kd, p_i2t, p_t2i,
                 v.loss.kd_temperature, v.loss.crd_soft_ce)


@register("fd", "feature distillation: MSE between projected normalised student and teacher embeddings",
          params=(PROJ_IMAGE, PROJ_TEXT))
def fd(v: Views):
    return T.fd(v.p("v", "rows"), v.p("t", "rows"), v.tf("v", "rows"), v.tf("t", "rows"))


@register("icl", "interactive contrastive learning: student anchors against teacher keys",
          params=(PROJ_IMAGE, PROJ_TEXT, ICL_SCALE))
def icl(v: Views):
    return T.icl(v.p("v", "rows"), v.p("t", "rows"), v.tf("v", "cols"), v.tf("t", "cols"), v.loss.learned_scale("icl"),
                 v.labels())


@register("xkd", "cross KD: KL from the teacher's softmax to the student-anchor/teacher-key softmax",
          teacher_scale=True, params=(PROJ_IMAGE, PROJ_TEXT, ICL_SCALE), options=("kd_temperature",))
def xkd(v: Views):
    p_i2t, p_t2i = v.targets()
    return T.xkd(v.p("v", "rows"), v.p("t", "rows"), v.tf("v", "cols"), v.tf("t", "cols"), v.loss.learned_scale("icl"),
                 p_i2t, p_t2i, v.loss.kd_temperature)


@register("mfd", "fd on the embedding of the student's masked image (ViT students)", masked_view=True,
          params=(PROJ_IMAGE, PROJ_TEXT))
def mfd(v: Views):
    return T.fd(v.p("vm", "rows"), v.p("t", "rows"), v.tf("v", "rows"), v.tf("t", "rows"))


@register("gd", "gradient distillation: MSE between analytic InfoNCE gradients of teacher and student",
          teacher_scale=True, params=(PROJ_IMAGE, PROJ_TEXT))
def gd(v: Views):
    return T.gd(v.p("v", "all"), v.p("t", "all"), v.s_kd, v.tf("v", "all"), v.tf("t", "all"), v.tf_scale())


def _afd_fused(v: Views, mod: str, view: str):
    fuse = v.loss.afd_fuse_image if mod == "v" else v.loss.afd_fuse_text
    return v.cached(("afd", mod, v.canon(view)),
                    lambda: T.afd_fuse(v.p(mod, view), v.tf(mod, view), fuse.weight, fuse.bias))


@register("afd", "augmented feature distillation: InfoNCE on fused (student, teacher) features",
          params=(PROJ_IMAGE, PROJ_TEXT, AFD_SCALE, AFD_FUSE_IMAGE, AFD_FUSE_TEXT))
def afd(v: Views):
    return T.afd(_afd_fused(v, "v", "rows"), _afd_fused(v, "t", "rows"), _afd_fused(v, "v", "cols"),
                 _afd_fused(v, "t", "cols"), v.loss.learned_scale("afd"), v.labels())


def _sim_args(v: Views):
    return (v.n("v", "rows"), v.n("t", "rows"), v.n("v", "cols"), v.n("t", "cols"),
            v.tf("v", "rows"), v.tf("t", "rows"), v.tf("v", "cols"), v.tf("t", "cols"))


@register("sim", "DistillCLIP similarity-map distillation (inter + intra)")
def sim(v: Views):
    return T.sim(*_sim_args(v))


@register("sim_inter", "DistillCLIP image-text similarity-map MSE only")
def sim_inter(v: Views):
    a = _sim_args(v)
    return T.sim_inter(a[0], a[3], a[4], a[7])


@register("sim_intra", "DistillCLIP image-image + text-text similarity-map MSE only")
def sim_intra(v: Views):
    return T.sim_intra(*_sim_args(v))


@register("emb", "embedding regression of the projected raw student image embedding (--emb-metric)",
          teacher_towers=("image",), params=(PROJ_IMAGE,), options=("emb_metric",))
def emb(v: Views):
    return T.emb(v.praw("v", "rows"), v.tf("v", "rows"), v.loss.emb_metric)


@register("emb_text", "embedding regression of the projected raw student text embedding (--emb-metric)",
          teacher_towers=("text",), params=(PROJ_TEXT,), options=("emb_metric",))
def emb_text(v: Views):
    return T.emb(v.praw("t", "rows"), v.tf("t", "rows"), v.loss.emb_metric)


@register("feat", "intermediate-layer token distillation (--feat-layers)", teacher_towers=(), teacher_internals=True,
          intermediates=True, params=(FEAT_PROJ,))
def feat(v: Views):
    loss = v.loss
    if v.student_intermediates is None or v.teacher_intermediates is None:
        raise ValueError("feat is active: pass student_intermediates and teacher_intermediates "
                         "({tower: [tokens per layer of loss_fn.feat_layers_for(role)[tower]]})")
    s_layers, t_layers = loss.feat_layers_for("student"), loss.feat_layers_for("teacher")
    s_tok, t_tok, ws, bs = [], [], [], []
    for pair, proj in zip(loss.feat_pairs, loss.feat_proj):
        s_list, t_list = v.student_intermediates[pair.tower], v.teacher_intermediates[pair.tower]
        if len(s_list) != len(s_layers[pair.tower]) or len(t_list) != len(t_layers[pair.tower]):
            raise ValueError(f"feat: expected {len(s_layers[pair.tower])} student and {len(t_layers[pair.tower])} "
                             f"teacher {pair.tower} token tensors (loss_fn.feat_layers_for)")
        s = s_list[s_layers[pair.tower].index(pair.student_layer)]
        t = t_list[t_layers[pair.tower].index(pair.teacher_layer)]
        s_tok.append(upcast(tokens(s)))
        t_tok.append(upcast(tokens(t).detach()))
        ws.append(proj.weight)
        bs.append(proj.bias)
    value = T.feat(s_tok, t_tok, ws, bs)
    if not loss.local_loss and v.world > 1:  # global mode: report the global mean (gradient unchanged)
        mean = distributed.reduce_sum(value.detach()) / v.world
        value = value + (mean - value.detach())
    return value


# sigmoid terms (registered after the others: the registry order is the state_dict and seeded-init order)

@register("task_siglip", "SigLIP sigmoid loss of the student on ground-truth pairs (a drop-in for task)",
          teacher=False, params=(SIGLIP_SCALE, SIGLIP_BIAS), options=("sigmoid_chunk",))
def task_siglip(v: Views):
    scale, bias = v.student_sigmoid()
    return T.task_siglip(v.n("v", "rows"), v.n("t", "cols"), scale, bias, v.labels(), v.loss.sigmoid_chunk)


@register("sig_kd", "sigmoid KD: BCE between the teacher's and the student's pairwise sigmoid probabilities",
          teacher_scale=True, teacher_bias=True, params=(SIGLIP_SCALE, SIGLIP_BIAS), options=("sigmoid_chunk",))
def sig_kd(v: Views):
    scale, bias = v.student_sigmoid()
    return T.sig_kd(v.n("v", "rows"), v.n("t", "cols"), scale, bias, v.teacher_members("v", "rows"),
                    v.teacher_members("t", "cols"), v.lt, v.teacher_biases(), v.loss.sigmoid_chunk)

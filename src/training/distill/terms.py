"""The distillation terms as plain functions of tensors (the math of docs/losses.md, nothing else).

Conventions shared by every function:
- "rows" are the anchors of a logit matrix, "cols" its keys. In global-loss mode rows == cols (the gathered global
  batch, G rows); in local-loss mode rows are this rank's B samples and `labels` = rank*B + arange(B) index them in
  the G columns. CE is mean-over-rows cross-entropy, KL is "batchmean" (sum over columns, mean over rows), MSE is a
  mean over all elements.
- Student inputs are already normalised (n = normalize(s)) or projected-and-normalised (p = normalize(P(s))) by
  the caller, teacher features are L2-normalised. Scales are multipliers (exp already applied).
- No function gathers, projects, or owns parameters: `DistillLoss` (loss.py) does that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
Scale = Tensor | float


def normalize(x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1)


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def contrastive_ce(a_rows: Tensor, b_rows: Tensor, a_cols: Tensor, b_cols: Tensor, scale: Scale,
                   labels: Tensor) -> Tensor:
    """½[CE(scale·a_rows b_colsᵀ, y) + CE(scale·b_rows a_colsᵀ, y)]: the symmetric CLIP InfoNCE."""
    logits_ab = scale * a_rows @ b_cols.t()
    logits_ba = scale * b_rows @ a_cols.t()
    return 0.5 * (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels))


def soft_kl(target_probs: Tensor, student_logits: Tensor, soft_ce: bool = False) -> Tensor:
    """KL(target ‖ softmax(student_logits)), batchmean; with soft_ce, the soft-target cross-entropy
    -Σ target·log_softmax(student) (= KL + H(target): same gradient, open_clip/TinyCLIP's form)."""
    log_q = F.log_softmax(student_logits, dim=-1)
    if soft_ce:
        return -(target_probs * log_q).sum(dim=-1).mean()
    return F.kl_div(log_q, target_probs, reduction="batchmean")


def teacher_targets(t_v_rows, t_t_rows, t_v_cols, t_t_cols, t_scale, tau: float = 1.0) -> tuple[Tensor, Tensor]:
    """Softmax targets (image->text, text->image) of the teacher: softmax(lt·t_v t_tᵀ/τ), softmax(lt·t_t t_vᵀ/τ).

    For a teacher ensemble pass sequences (one entry per member, each with its own scale): the members' softmax
    distributions are averaged (MobileCLIP's ensemble KD)."""
    v_rows, t_rows, v_cols, t_cols, scales = map(_as_list, (t_v_rows, t_t_rows, t_v_cols, t_t_cols, t_scale))
    if not len(v_rows) == len(t_rows) == len(v_cols) == len(t_cols) == len(scales):
        raise ValueError("teacher ensemble: every teacher argument needs one entry per member")
    p_i2t = p_t2i = 0.0
    for vr, tr, vc, tc, sc in zip(v_rows, t_rows, v_cols, t_cols, scales):
        p_i2t = p_i2t + F.softmax(sc * vr @ tc.t() / tau, dim=-1)
        p_t2i = p_t2i + F.softmax(sc * tr @ vc.t() / tau, dim=-1)
    k = len(scales)
    return p_i2t / k, p_t2i / k


def task(n_v_rows, n_t_rows, n_v_cols, n_t_cols, scale: Scale, labels: Tensor) -> Tensor:
    """½[CE(ls·n_v n_tᵀ, y) + CE(ls·n_t n_vᵀ, y)]."""
    return contrastive_ce(n_v_rows, n_t_rows, n_v_cols, n_t_cols, scale, labels)


def crd(n_v_rows, n_t_rows, n_v_cols, n_t_cols, scale: Scale, target_i2t: Tensor, target_t2i: Tensor,
        tau: float = 1.0, soft_ce: bool = False) -> Tensor:
    """τ²·½[KL(P_i2t ‖ softmax(ls·n_v n_tᵀ/τ)) + KL(P_t2i ‖ softmax(ls·n_t n_vᵀ/τ))], P from `teacher_targets`."""
    kl_i2t = soft_kl(target_i2t, scale * n_v_rows @ n_t_cols.t() / tau, soft_ce)
    kl_t2i = soft_kl(target_t2i, scale * n_t_rows @ n_v_cols.t() / tau, soft_ce)
    return tau * tau * 0.5 * (kl_i2t + kl_t2i)


def fd(p_v: Tensor, p_t: Tensor, t_v: Tensor, t_t: Tensor) -> Tensor:
    """MSE(ŝ_v, t_v) + MSE(ŝ_t, t_t); `mfd` is this with ŝ_v from the masked image."""
    return F.mse_loss(p_v, t_v) + F.mse_loss(p_t, t_t)


def icl(p_v_rows, p_t_rows, t_v_cols, t_t_cols, scale: Scale, labels: Tensor) -> Tensor:
    """½[CE(c·ŝ_v t_tᵀ, y) + CE(c·ŝ_t t_vᵀ, y)]: student anchors, teacher keys."""
    return contrastive_ce(p_v_rows, p_t_rows, t_v_cols, t_t_cols, scale, labels)


def xkd(p_v_rows, p_t_rows, t_v_cols, t_t_cols, scale: Scale, target_i2t: Tensor, target_t2i: Tensor,
        tau: float = 1.0) -> Tensor:
    """τ²·½[KL(P_i2t ‖ softmax(c·ŝ_v t_tᵀ/τ)) + KL(P_t2i ‖ softmax(c·ŝ_t t_vᵀ/τ))]."""
    kl_i2t = soft_kl(target_i2t, scale * p_v_rows @ t_t_cols.t() / tau)
    kl_t2i = soft_kl(target_t2i, scale * p_t_rows @ t_v_cols.t() / tau)
    return tau * tau * 0.5 * (kl_i2t + kl_t2i)


def infonce_grads(a: Tensor, k: Tensor, scale: Scale) -> tuple[Tensor, Tensor]:
    """Analytic gradients of CE(Z, arange(G)), Z = scale·a kᵀ, w.r.t. the anchors a and the keys k:
    g_a = scale·(P−Y)k/G, g_k = scale·(P−Y)ᵀa/G, with Y = I: (P−I)k = Pk − k, so neither P−I nor a G×d×G tensor
    is built; two matrix products, extra memory O(G·d) beyond the G×G softmax every contrastive term has."""
    g = a.shape[0]
    p = F.softmax(scale * a @ k.t(), dim=-1)
    return scale * (p @ k - k) / g, scale * (p.t() @ a - a) / g


def gd(p_v: Tensor, p_t: Tensor, s_scale: Scale, t_v: Tensor, t_t: Tensor, t_scale: Scale) -> Tensor:
    """Σ over (anchor, key) ∈ {(v,t), (t,v)} of MSE(g_a^S, g_a^T) + MSE(g_k^S, g_k^T), on the global batch."""
    total = 0.0
    for (sa, sk), (ta, tk) in (((p_v, p_t), (t_v, t_t)), ((p_t, p_v), (t_t, t_v))):
        gs_a, gs_k = infonce_grads(sa, sk, s_scale)
        with torch.no_grad():
            gt_a, gt_k = infonce_grads(ta, tk, t_scale)
        total = total + F.mse_loss(gs_a, gt_a) + F.mse_loss(gs_k, gt_k)
    return total


def afd_fuse(p: Tensor, t: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """f = normalize(F[ŝ ; t]) with F = Linear(2·d_t → d_t) given by (weight, bias)."""
    return normalize(F.linear(torch.cat([p, t], dim=-1), weight, bias))


def afd(f_v_rows, f_t_rows, f_v_cols, f_t_cols, scale: Scale, labels: Tensor) -> Tensor:
    """½[CE(a·f_v f_tᵀ, y) + CE(a·f_t f_vᵀ, y)] on fused features (see `afd_fuse`)."""
    return contrastive_ce(f_v_rows, f_t_rows, f_v_cols, f_t_cols, scale, labels)


def sim_inter(n_v_rows, n_t_cols, t_v_rows, t_t_cols) -> Tensor:
    """MSE(t_v t_tᵀ, n_v n_tᵀ) on cosine maps (no scales)."""
    return F.mse_loss(n_v_rows @ n_t_cols.t(), t_v_rows @ t_t_cols.t())


def sim_intra(n_v_rows, n_t_rows, n_v_cols, n_t_cols, t_v_rows, t_t_rows, t_v_cols, t_t_cols) -> Tensor:
    """MSE(t_v t_vᵀ, n_v n_vᵀ) + MSE(t_t t_tᵀ, n_t n_tᵀ)."""
    return (F.mse_loss(n_v_rows @ n_v_cols.t(), t_v_rows @ t_v_cols.t())
            + F.mse_loss(n_t_rows @ n_t_cols.t(), t_t_rows @ t_t_cols.t()))


def sim(n_v_rows, n_t_rows, n_v_cols, n_t_cols, t_v_rows, t_t_rows, t_v_cols, t_t_cols) -> Tensor:
    """DistillCLIP: sim_inter + sim_intra."""
    return (sim_inter(n_v_rows, n_t_cols, t_v_rows, t_t_cols)
            + sim_intra(n_v_rows, n_t_rows, n_v_cols, n_t_cols, t_v_rows, t_t_rows, t_v_cols, t_t_cols))


def emb(pred: Tensor, target: Tensor, metric: str = "mse") -> Tensor:
    """NVIDIA-style embedding regression metric(P(s), t): mse | l1 | smooth_l1 | cosine (mean of 1 − cos)."""
    if metric == "mse":
        return F.mse_loss(pred, target)
    if metric == "l1":
        return F.l1_loss(pred, target)
    if metric == "smooth_l1":
        return F.smooth_l1_loss(pred, target)
    if metric == "cosine":
        return (1.0 - F.cosine_similarity(pred, target, dim=-1)).mean()
    raise ValueError(f"unknown embedding metric '{metric}' (mse, l1, smooth_l1, cosine)")


def resize_tokens(x: Tensor, n: int) -> Tensor:
    """[B, N, C] tokens -> [B, n, C] by average pooling: on the 2-D grid when N and n are perfect squares
    (image patches / feature maps), along the sequence otherwise. A no-op when N == n."""
    b, m, c = x.shape
    if m == n:
        return x
    gm, gn = math.isqrt(m), math.isqrt(n)
    if gm * gm == m and gn * gn == n:
        grid = x.transpose(1, 2).reshape(b, c, gm, gm)
        return F.adaptive_avg_pool2d(grid, gn).flatten(2).transpose(1, 2)
    return F.adaptive_avg_pool1d(x.transpose(1, 2), n).transpose(1, 2)


def feat(student_tokens: Sequence[Tensor], teacher_tokens: Sequence[Tensor], weights: Sequence[Tensor],
         biases: Sequence[Tensor | None]) -> Tensor:
    """Mean over layer pairs of MSE(resize(W_k s_k + b_k), resize(t_k)); both sides are pooled to the smaller
    token count (pooling and the linear map commute, so the student is pooled first)."""
    losses = []
    for s, t, w, b in zip(student_tokens, teacher_tokens, weights, biases):
        n = min(s.shape[1], t.shape[1])
        pred = F.linear(resize_tokens(s, n), w, b)
        losses.append(F.mse_loss(pred, resize_tokens(t, n).to(pred.dtype)))
    if not losses:
        raise ValueError("feat: no layer pairs")
    return torch.stack(losses).mean()

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


# ---- sigmoid (SigLIP) terms ---------------------------------------------------------------------------------------

SIGMOID_CHUNK = 1024  # rows of the pair matrix evaluated at once: memory O(chunk·G)


class _SigmoidPairs(torch.autograd.Function):
    """Σ_{i,j} [softplus(X_ij) − T_ij·X_ij] over X = scale·a bᵀ + bias (rows a, columns b), with targets T made per
    chunk of rows by `targets(i0, i1)` (no grad). Rows are evaluated `chunk` at a time and the backward recomputes
    each chunk's logits, so no rows×cols tensor outlives a chunk: ∂/∂X = σ(X) − T."""

    @staticmethod
    def forward(ctx, a, b, scale, bias, targets, chunk):
        ctx.save_for_backward(a, b, scale, bias)
        ctx.targets, ctx.chunk = targets, chunk
        total = a.new_zeros(())
        with torch.autocast(a.device.type, enabled=False):
            for i0 in range(0, a.shape[0], chunk):
                i1 = min(i0 + chunk, a.shape[0])
                x = scale * (a[i0:i1] @ b.t()) + bias
                total = total + (F.softplus(x) - targets(i0, i1) * x).sum()
        return total

    @staticmethod
    def backward(ctx, grad):
        a, b, scale, bias = ctx.saved_tensors
        grad_a = torch.empty_like(a)
        grad_b = torch.zeros_like(b)
        grad_scale = scale.new_zeros(())
        grad_bias = bias.new_zeros(())
        with torch.autocast(a.device.type, enabled=False):
            for i0 in range(0, a.shape[0], ctx.chunk):
                i1 = min(i0 + ctx.chunk, a.shape[0])
                sim = a[i0:i1] @ b.t()
                d = (torch.sigmoid(scale * sim + bias) - ctx.targets(i0, i1)) * grad
                grad_a[i0:i1] = scale * (d @ b)
                grad_b += scale * (d.t() @ a[i0:i1])
                grad_scale = grad_scale + (d * sim).sum()
                grad_bias = grad_bias + d.sum()
        return grad_a, grad_b, grad_scale.reshape(scale.shape), grad_bias.reshape(bias.shape), None, None


def _as_tensor(x: Scale, like: Tensor) -> Tensor:
    return x.to(like.dtype) if isinstance(x, Tensor) else torch.tensor(float(x), dtype=like.dtype, device=like.device)


def sigmoid_pair_loss(rows: Tensor, cols: Tensor, scale: Scale, bias: Scale, targets, chunk: int = SIGMOID_CHUNK
                      ) -> Tensor:
    """(1/rows)·Σ_{i,j} [softplus(X_ij) − T_ij·X_ij], X = scale·rows colsᵀ + bias: binary cross-entropy of every
    pair against targets T ∈ [0, 1] (`targets(i0, i1)` -> the [i1−i0, cols] block), evaluated in chunks of rows."""
    if chunk < 1:
        raise ValueError(f"sigmoid chunk must be >= 1, got {chunk}")
    total = _SigmoidPairs.apply(rows, cols, _as_tensor(scale, rows), _as_tensor(bias, rows), targets, int(chunk))
    return total / rows.shape[0]


def pair_targets(labels: Tensor, n_cols: int, dtype: torch.dtype):
    """targets(i0, i1) of the ground-truth pairs: 1 at (i, labels[i]), 0 elsewhere."""
    def targets(i0: int, i1: int) -> Tensor:
        t = torch.zeros(i1 - i0, n_cols, dtype=dtype, device=labels.device)
        t[torch.arange(i1 - i0, device=labels.device), labels[i0:i1]] = 1.0
        return t
    return targets


def teacher_sigmoid_targets(t_v_rows, t_t_cols, t_scale, t_bias):
    """targets(i0, i1) = mean over members of σ(lt·t_v t_tᵀ + b_T) on those rows (one entry per member in each
    sequence: each member keeps its own scale and bias; the probabilities are averaged after the sigmoid)."""
    v_rows, t_cols, scales, biases = map(_as_list, (t_v_rows, t_t_cols, t_scale, t_bias))
    if not len(v_rows) == len(t_cols) == len(scales) == len(biases):
        raise ValueError("teacher ensemble: every teacher argument needs one entry per member")

    def targets(i0: int, i1: int) -> Tensor:
        with torch.no_grad():
            p = 0.0
            for vr, tc, sc, b in zip(v_rows, t_cols, scales, biases):
                p = p + torch.sigmoid(sc * vr[i0:i1] @ tc.t() + b)
            return p / len(scales)
    return targets


def task_siglip(n_v_rows: Tensor, n_t_cols: Tensor, scale: Scale, bias: Scale, labels: Tensor,
                chunk: int = SIGMOID_CHUNK) -> Tensor:
    """(1/rows)·Σ_{i,j} softplus(−z_ij·X_ij), X = t_S·n_v n_tᵀ + b_S, z = +1 on the ground-truth pairs: SigLIP."""
    return sigmoid_pair_loss(n_v_rows, n_t_cols, scale, bias, pair_targets(labels, n_t_cols.shape[0], n_v_rows.dtype),
                             chunk)


def sig_kd(n_v_rows: Tensor, n_t_cols: Tensor, scale: Scale, bias: Scale, t_v_rows, t_t_cols, t_scale, t_bias,
           chunk: int = SIGMOID_CHUNK) -> Tensor:
    """(1/rows)·Σ_{i,j} BCE(Q_ij, σ(X_ij)), Q = the teachers' averaged sigmoid probabilities."""
    return sigmoid_pair_loss(n_v_rows, n_t_cols, scale, bias, teacher_sigmoid_targets(t_v_rows, t_t_cols, t_scale,
                                                                                      t_bias), chunk)

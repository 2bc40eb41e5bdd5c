"""Every distillation term against an independent NumPy/loop re-implementation of docs/losses.md (value and
gradient), the worked example, gradcheck of the term functions, and the relations between methods."""

import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

import training.distill.terms as T
from training.distill import DistillLoss, FeatPair, build_distill_loss

torch.set_num_threads(1)
ALL = "task=1,crd=1,fd=1,icl=1,xkd=1,mfd=1,gd=1,afd=1,sim=1,sim_inter=1,sim_intra=1,emb=1,emb_text=1"

# ---------------------------------------------------------------------------------------------------------------
# independent reference (NumPy, float64, explicit loops over rows); never calls training.distill


def n_(x):
    return x / np.sqrt((x * x).sum(axis=1, keepdims=True))


def log_softmax_rows(z):
    out = np.empty_like(z)
    for i in range(z.shape[0]):
        m = z[i].max()
        out[i] = z[i] - m - math.log(np.exp(z[i] - m).sum())
    return out


def ce(z, labels):
    ls = log_softmax_rows(z)
    return -np.mean([ls[i, labels[i]] for i in range(z.shape[0])])


def kl(p, z_student):
    lq = log_softmax_rows(z_student)
    rows = []
    for i in range(p.shape[0]):
        rows.append(sum(p[i, j] * (math.log(p[i, j]) - lq[i, j]) for j in range(p.shape[1]) if p[i, j] > 0))
    return np.mean(rows)


def softmax_rows(z):
    return np.exp(log_softmax_rows(z))


def mse(a, b):
    return np.mean((a - b) ** 2)


def lin(x, w, b):
    return x @ w.T + (0 if b is None else b)


def adaptive_pool_1d(x, n):  # x [N, C] -> [n, C], PyTorch's adaptive bins
    m = x.shape[0]
    return np.stack([x[(i * m) // n: -((-(i + 1) * m) // n)].mean(axis=0) for i in range(n)])


def resize(x, n):  # x [B, N, C]
    m = x.shape[1]
    if m == n:
        return x
    gm, gn = math.isqrt(m), math.isqrt(n)
    out = []
    for tok in x:
        if gm * gm == m and gn * gn == n:
            grid = tok.reshape(gm, gm, -1)
            rows = np.stack([adaptive_pool_1d(grid[:, j], gn) for j in range(gm)], axis=1)  # pool H
            grid = np.stack([adaptive_pool_1d(rows[i], gn) for i in range(gn)])  # pool W
            out.append(grid.reshape(gn * gn, -1))
        else:
            out.append(adaptive_pool_1d(tok, n))
    return np.stack(out)


def ref_gd_grads(a, k, scale):
    g = a.shape[0]
    p = softmax_rows(scale * a @ k.T)
    ga, gk = np.zeros_like(a), np.zeros_like(k)
    for i in range(g):
        for j in range(g):
            d = p[i, j] - (1.0 if i == j else 0.0)
            ga[i] += scale * d * k[j] / g
            gk[j] += scale * d * a[i] / g
    return ga, gk


def reference(sv, st, ls, tvs, tts, lts, prm, tau=1.0, metric="mse", svm=None, member=None, s_kd=None):
    """All terms from raw student features; tvs/tts/lts are lists (one per teacher member)."""
    g = sv.shape[0]
    y = np.arange(g)
    nv, nt = n_(sv), n_(st)
    if member is not None:
        tv, tt = tvs[member], tts[member]
    else:
        tv, tt = n_(np.concatenate(tvs, 1)), n_(np.concatenate(tts, 1))
    pv, pt = lin(sv, *prm["pv"]) if prm["pv"] else sv, lin(st, *prm["pt"]) if prm["pt"] else st
    hv, ht = n_(pv), n_(pt)
    s_kd = ls if s_kd is None else s_kd
    p_i2t = np.mean([softmax_rows(lt * a @ b.T / tau) for a, b, lt in zip(tvs, tts, lts)], axis=0)
    p_t2i = np.mean([softmax_rows(lt * b @ a.T / tau) for a, b, lt in zip(tvs, tts, lts)], axis=0)
    c, a = prm["c"], prm["a"]
    out = {
        "task": 0.5 * (ce(ls * nv @ nt.T, y) + ce(ls * nt @ nv.T, y)),
        "crd": tau ** 2 * 0.5 * (kl(p_i2t, s_kd * nv @ nt.T / tau) + kl(p_t2i, s_kd * nt @ nv.T / tau)),
        "fd": mse(hv, tv) + mse(ht, tt),
        "icl": 0.5 * (ce(c * hv @ tt.T, y) + ce(c * ht @ tv.T, y)),
        "xkd": tau ** 2 * 0.5 * (kl(p_i2t, c * hv @ tt.T / tau) + kl(p_t2i, c * ht @ tv.T / tau)),
        "sim_inter": mse(tv @ tt.T, nv @ nt.T),
        "sim_intra": mse(tv @ tv.T, nv @ nv.T) + mse(tt @ tt.T, nt @ nt.T),
    }
    out["sim"] = out["sim_inter"] + out["sim_intra"]
    hvm = n_(lin(svm, *prm["pv"]) if prm["pv"] else svm) if svm is not None else hv
    out["mfd"] = mse(hvm, tv) + mse(ht, tt)
    lt_f = lts[member] if member is not None else np.mean(lts)
    gd = 0.0
    for sa, sk, ta, tk in ((hv, ht, tv, tt), (ht, hv, tt, tv)):
        gsa, gsk = ref_gd_grads(sa, sk, s_kd)
        gta, gtk = ref_gd_grads(ta, tk, lt_f)
        gd += mse(gsa, gta) + mse(gsk, gtk)
    out["gd"] = gd
    fv = n_(lin(np.concatenate([hv, tv], 1), *prm["fv"]))
    ft = n_(lin(np.concatenate([ht, tt], 1), *prm["ft"]))
    out["afd"] = 0.5 * (ce(a * fv @ ft.T, y) + ce(a * ft @ fv.T, y))
    for name, pred, tgt in (("emb", pv, tv), ("emb_text", pt, tt)):
        if metric == "mse":
            out[name] = mse(pred, tgt)
        elif metric == "l1":
            out[name] = np.mean(np.abs(pred - tgt))
        elif metric == "smooth_l1":
            d = np.abs(pred - tgt)
            out[name] = np.mean(np.where(d < 1, 0.5 * d * d, d - 0.5))
        else:
            out[name] = np.mean(1 - (pred * tgt).sum(1) / np.linalg.norm(pred, axis=1) / np.linalg.norm(tgt, axis=1))
    return out


def ref_feat(pairs):
    vals = []
    for s_tok, t_tok, w, b in pairs:
        m = min(s_tok.shape[1], t_tok.shape[1])
        vals.append(mse(lin(resize(s_tok, m), w, b), resize(t_tok, m)))
    return np.mean(vals)


def params_of(loss: DistillLoss):
    def lp(layer):
        return None if layer is None else (layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy())

    return {"pv": lp(loss.proj_image), "pt": lp(loss.proj_text),
            "c": loss.learned_scale("icl").item() if loss.icl_logit_scale is not None else None,
            "a": loss.learned_scale("afd").item() if loss.afd_logit_scale is not None else None,
            "fv": lp(loss.afd_fuse_image), "ft": lp(loss.afd_fuse_text)}


def rand_inputs(g=4, d_s=3, d_t=(5,), seed=0):
    r = np.random.default_rng(seed)
    sv, st = r.normal(size=(g, d_s)), r.normal(size=(g, d_s))
    tvs = [n_(r.normal(size=(g, d))) for d in d_t]
    tts = [n_(r.normal(size=(g, d))) for d in d_t]
    return sv, st, tvs, tts


def run_module(loss, sv, st, ls, tvs, tts, lts, **kw):
    sv_t = torch.tensor(sv, requires_grad=True)
    st_t = torch.tensor(st, requires_grad=True)
    ls_t = torch.tensor(ls, dtype=torch.float64, requires_grad=True)
    tv = [torch.tensor(x) for x in tvs]
    tt = [torch.tensor(x) for x in tts]
    lt = [torch.tensor(x, dtype=torch.float64) for x in lts]
    if len(tv) == 1:
        tv, tt, lt = tv[0], tt[0], lt[0]
    out = loss(student_image=sv_t, student_text=st_t, student_scale=ls_t, teacher_image=tv, teacher_text=tt,
               teacher_scale=lt, **kw)
    return out, (sv_t, st_t, ls_t)


def numeric_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        old = x[idx]
        x[idx] = old + eps
        hi = f()
        x[idx] = old - eps
        lo = f()
        x[idx] = old
        g[idx] = (hi - lo) / (2 * eps)
    return g


# ---------------------------------------------------------------------------------------------------------------


def test_worked_example_compat():
    sv = torch.tensor([[3.0, 4.0], [4.0, 3.0]])
    st = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    tv = torch.eye(2)
    tt = F.normalize(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), dim=-1)
    loss = build_distill_loss("task=1,crd=1,fd=1,icl=1,xkd=1", student_dim=2, teacher_dim=2, compat="clipkd")
    out = loss(student_image=sv, student_text=st, student_scale=torch.tensor(10.0), teacher_image=tv,
               teacher_text=tt, teacher_scale=torch.tensor(100.0))
    expected = {"task": 2.126928, "crd": 1.703641, "fd": 0.546447, "icl": 0.486973, "xkd": 0.646093}
    for name, value in expected.items():
        assert round(out[name].item(), 6) == pytest.approx(value, abs=1.5e-6), name
    assert out["total"].item() == pytest.approx(sum(expected.values()), abs=1e-5)
    assert loss.learned_scale("icl").item() == pytest.approx(2.659260, abs=1e-6)  # raw multiplier
    # without compat the same parameter is used as exp(.) = 1/0.07
    assert build_distill_loss("icl=1", 2, 2).learned_scale("icl").item() == pytest.approx(1 / 0.07, rel=1e-6)


@pytest.mark.parametrize("case", [
    dict(d_s=3, d_t=(5,), compat="none", tau=1.0, metric="mse"),
    dict(d_s=4, d_t=(4,), compat="clipkd", tau=2.0, metric="l1"),  # identity projection
    dict(d_s=3, d_t=(5, 4), compat="none", tau=1.0, metric="smooth_l1"),  # ensemble: concatenation
    dict(d_s=3, d_t=(5, 4), compat="none", tau=4.0, metric="cosine", member=1, s_kd=7.0),  # ensemble member
])
def test_all_terms_value_and_gradient_vs_reference(case):
    member, s_kd = case.get("member"), case.get("s_kd")
    sv, st, tvs, tts = rand_inputs(d_s=case["d_s"], d_t=case["d_t"], seed=len(case["d_t"]) + int(case["tau"]))
    svm = sv + 0.3 * np.random.default_rng(5).normal(size=sv.shape)
    ls, lts = 9.0, [30.0, 20.0][: len(tvs)]
    loss = build_distill_loss(ALL, case["d_s"], list(case["d_t"]), compat=case["compat"],
                              kd_temperature=case["tau"], emb_metric=case["metric"], teacher_member=member,
                              student_kd_logit_scale=s_kd).double()
    with torch.no_grad():  # move the learnable scales off their init so both scale paths are exercised
        loss.icl_logit_scale.add_(0.1)
        loss.afd_logit_scale.sub_(0.2)
    if case["d_s"] == case["d_t"][0] and len(case["d_t"]) == 1:
        assert loss.proj_image is None and loss.proj_text is None
    prm = params_of(loss)
    svm_t = torch.tensor(svm, requires_grad=True)
    out, (sv_t, st_t, ls_t) = run_module(loss, sv, st, ls, tvs, tts, lts, student_image_masked=svm_t)
    ref = reference(sv, st, ls, tvs, tts, lts, prm, case["tau"], case["metric"], svm=svm, member=member, s_kd=s_kd)
    for name in ref:
        assert out[name].item() == pytest.approx(ref[name], rel=1e-9, abs=1e-12), name
    # gradients of every term w.r.t. the raw student features, against finite differences of the reference
    ls_np = np.array([ls])
    for name in ref:
        g_sv, g_st, g_svm, g_ls = torch.autograd.grad(out[name], (sv_t, st_t, svm_t, ls_t), retain_graph=True,
                                                      allow_unused=True)
        g_ls = None if g_ls is None else g_ls.reshape(1)
        for x_np, g in ((sv, g_sv), (st, g_st), (svm, g_svm), (ls_np, g_ls)):
            num = numeric_grad(lambda name=name: reference(sv, st, ls_np[0], tvs, tts, lts, prm, case["tau"],
                                                           case["metric"], svm=svm, member=member,
                                                           s_kd=s_kd)[name], x_np)
            got = np.zeros_like(num) if g is None else g.numpy()
            np.testing.assert_allclose(got, num, rtol=1e-5, atol=1e-7, err_msg=name)


def test_loss_side_parameter_gradients_vs_reference():
    sv, st, tvs, tts = rand_inputs(seed=3)
    ls, lts = 5.0, [40.0]
    loss = build_distill_loss("icl=1,afd=1,fd=1", 3, 5).double()
    out, _ = run_module(loss, sv, st, ls, tvs, tts, lts)
    out["total"].backward()
    prm = params_of(loss)

    def total():
        r = reference(sv, st, ls, tvs, tts, lts, prm)
        return r["icl"] + r["afd"] + r["fd"]

    np.testing.assert_allclose(loss.proj_image.weight.grad.numpy(), numeric_grad(total, prm["pv"][0]), rtol=1e-5,
                               atol=1e-8)
    np.testing.assert_allclose(loss.afd_fuse_text.bias.grad.numpy(), numeric_grad(total, prm["ft"][1]), rtol=1e-5,
                               atol=1e-8)
    # d total / d log_c = c * d total / d c  (scale stored in log space)
    c0, eps = prm["c"], 1e-6
    prm["c"] = c0 + eps
    hi = total()
    prm["c"] = c0 - eps
    lo = total()
    prm["c"] = c0
    assert loss.icl_logit_scale.grad.item() == pytest.approx(c0 * (hi - lo) / (2 * eps), rel=1e-5)


def test_feat_vs_reference():
    r = np.random.default_rng(7)
    g = 3
    s_img = [r.normal(size=(g, 4, 3)), r.normal(size=(g, 6, 3))]  # 2x2 grid; a 6-token sequence
    t_img = [r.normal(size=(g, 16, 5)), r.normal(size=(g, 4, 2))]  # 4x4 grid pooled to 2x2; 6 -> 4 tokens (1-D)
    s_txt = [r.normal(size=(g, 5, 3))]
    t_txt = [r.normal(size=(g, 5, 4))]
    pairs = [FeatPair("image", 0, 2, 3, 5), FeatPair("image", 1, 0, 3, 2), FeatPair("text", 1, 1, 3, 4)]
    loss = build_distill_loss("feat=1", 3, 5, feat_layers=pairs).double()
    assert loss.feat_layers_for("student") == {"image": [0, 1], "text": [1]}
    assert loss.feat_layers_for("teacher") == {"image": [0, 2], "text": [1]}
    s_t = [torch.tensor(x, requires_grad=True) for x in s_img + s_txt]
    sv, st = torch.zeros(g, 3, dtype=torch.float64), torch.zeros(g, 3, dtype=torch.float64)
    out = loss(student_image=sv, student_text=st, student_scale=torch.tensor(1.0), teacher_image=torch.zeros(g, 5),
               teacher_text=torch.zeros(g, 5), teacher_scale=torch.tensor(1.0),
               student_intermediates={"image": s_t[:2], "text": s_t[2:]},
               teacher_intermediates={"image": [torch.tensor(t_img[1]), torch.tensor(t_img[0])],
                                      "text": [torch.tensor(t_txt[0])]})
    ws = [(m.weight.detach().numpy(), m.bias.detach().numpy()) for m in loss.feat_proj]
    feat = lambda: [(s_img[0], t_img[0], *ws[0]), (s_img[1], t_img[1], *ws[1]), (s_txt[0], t_txt[0], *ws[2])]  # noqa: E731
    ref = ref_feat(feat())
    assert out["feat"].item() == pytest.approx(ref, rel=1e-10)
    grads = torch.autograd.grad(out["feat"], s_t)
    for x_np, gr in zip(s_img + s_txt, grads):
        num = numeric_grad(lambda: ref_feat(feat()), x_np)
        np.testing.assert_allclose(gr.numpy(), num, rtol=1e-5, atol=1e-8)
    # NCHW feature maps (timm towers) are accepted and flattened to tokens
    fm = torch.tensor(s_img[0]).transpose(1, 2).reshape(g, 3, 2, 2)
    out2 = loss(student_image=sv, student_text=st, student_scale=torch.tensor(1.0), teacher_image=torch.zeros(g, 5),
                teacher_text=torch.zeros(g, 5), teacher_scale=torch.tensor(1.0),
                student_intermediates={"image": [fm, s_t[1]], "text": s_t[2:]},
                teacher_intermediates={"image": [torch.tensor(t_img[1]), torch.tensor(t_img[0])],
                                       "text": [torch.tensor(t_txt[0])]})
    assert out2["feat"].item() == pytest.approx(ref, rel=1e-10)


def test_gradcheck_term_functions():
    gen = torch.Generator().manual_seed(0)

    def r(*shape, unit=False):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        return F.normalize(x, dim=-1) if unit else x

    g, d = 4, 3
    y = torch.arange(g)
    tv, tt = r(g, d, unit=True), r(g, d, unit=True)
    p_i2t, p_t2i = T.teacher_targets(tv, tt, tv, tt, torch.tensor(20.0, dtype=torch.float64), 2.0)
    nrm = T.normalize
    w, b = r(d, 2 * d), r(d)
    cases = {
        "task": lambda a, c: T.task(nrm(a), nrm(c), nrm(a), nrm(c), 7.0, y),
        "crd": lambda a, c: T.crd(nrm(a), nrm(c), nrm(a), nrm(c), 7.0, p_i2t, p_t2i, 2.0),
        "fd": lambda a, c: T.fd(nrm(a), nrm(c), tv, tt),
        "icl": lambda a, c: T.icl(nrm(a), nrm(c), tv, tt, 5.0, y),
        "xkd": lambda a, c: T.xkd(nrm(a), nrm(c), tv, tt, 5.0, p_i2t, p_t2i, 2.0),
        "gd": lambda a, c: T.gd(nrm(a), nrm(c), 6.0, tv, tt, 20.0),
        "afd": lambda a, c: T.afd(T.afd_fuse(nrm(a), tv, w, b), T.afd_fuse(nrm(c), tt, w, b),
                                  T.afd_fuse(nrm(a), tv, w, b), T.afd_fuse(nrm(c), tt, w, b), 4.0, y),
        "sim": lambda a, c: T.sim(nrm(a), nrm(c), nrm(a), nrm(c), tv, tt, tv, tt),
        "emb_cos": lambda a, c: T.emb(a, tv, "cosine") + T.emb(c, tt, "smooth_l1"),
        "feat": lambda a, c: T.feat([a.reshape(g, 1, d).expand(g, 4, d)], [tv.reshape(g, 1, d)], [w[:, :d]], [b]),
    }
    for name, fn in cases.items():
        a, c = r(g, d).requires_grad_(), r(g, d).requires_grad_()
        assert torch.autograd.gradcheck(fn, (a, c)), name


def test_infonce_grads_are_the_autograd_gradients_of_ce():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    F.cross_entropy(3.0 * a @ k.t(), torch.arange(6)).backward()
    ga, gk = T.infonce_grads(a.detach(), k.detach(), 3.0)
    torch.testing.assert_close(ga, a.grad)
    torch.testing.assert_close(gk, k.grad)


def test_open_clip_distill_loss_has_crd_gradients():
    gen = torch.Generator().manual_seed(2)
    sv, st = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    tv, tt = F.normalize(torch.randn(6, 8, generator=gen), dim=-1), F.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    ls, lt = torch.tensor(12.0), torch.tensor(60.0)

    def grads(fn):
        a, b = sv.clone().requires_grad_(), st.clone().requires_grad_()
        value = fn(a, b)
        return value, torch.autograd.grad(value, (a, b))

    oc = open_clip.loss.DistillClipLoss()
    v_oc, g_oc = grads(lambda a, b: oc(F.normalize(a, dim=-1), F.normalize(b, dim=-1), ls, tv, tt, lt)[1])
    kl_loss = build_distill_loss("crd=1", 8, 8)
    v_kl, g_kl = grads(lambda a, b: kl_loss(student_image=a, student_text=b, student_scale=ls, teacher_image=tv,
                                            teacher_text=tt, teacher_scale=lt)["crd"])
    torch.testing.assert_close(g_kl, g_oc)
    # the values differ by the teacher's entropy (a constant); the open_clip preset reports the soft-CE form
    p = F.softmax(lt * tv @ tt.t(), dim=-1), F.softmax(lt * tt @ tv.t(), dim=-1)
    entropy = 0.5 * sum(-(q * q.clamp_min(1e-30).log()).sum(-1).mean() for q in p)
    assert v_oc.item() == pytest.approx(v_kl.item() + entropy.item(), rel=1e-5)
    soft = build_distill_loss("task=1,crd=1", 8, 8, crd_soft_ce=True)
    v_soft, g_soft = grads(lambda a, b: soft(student_image=a, student_text=b, student_scale=ls, teacher_image=tv,
                                             teacher_text=tt, teacher_scale=lt)["crd"])
    assert v_soft.item() == pytest.approx(v_oc.item(), rel=1e-5)
    torch.testing.assert_close(g_soft, g_oc)


def test_crd_with_identical_teachers_equals_one_teacher_and_ensemble_averages_softmaxes():
    sv, st, tvs, tts = rand_inputs(g=5, d_s=4, d_t=(4, 4), seed=11)
    one = build_distill_loss("crd=1", 4, 4).double()
    three = build_distill_loss("crd=1", 4, [4, 4, 4]).double()
    o1, _ = run_module(one, sv, st, 8.0, [tvs[0]], [tts[0]], [50.0])
    o3, _ = run_module(three, sv, st, 8.0, [tvs[0]] * 3, [tts[0]] * 3, [50.0] * 3)
    assert o3["crd"].item() == pytest.approx(o1["crd"].item(), rel=1e-12)
    two = build_distill_loss("crd=1", 4, [4, 4]).double()
    o2, _ = run_module(two, sv, st, 8.0, tvs, tts, [50.0, 20.0])
    ref = reference(sv, st, 8.0, tvs, tts, [50.0, 20.0], {"pv": None, "pt": None, "c": 1, "a": 1,
                                                           "fv": (np.eye(4, 8), None), "ft": (np.eye(4, 8), None)},
                    member=0)  # crd does not depend on the feature-level teacher
    assert o2["crd"].item() == pytest.approx(ref["crd"], rel=1e-10)


def test_crd_tau4_is_klmobile_response_kd():
    """KLmobile's response KD: tau^2 * KL(softmax(z_T/tau) || softmax(z_S/tau)) on the logit matrices, tau = 4."""
    sv, st, tvs, tts = rand_inputs(g=5, d_s=4, d_t=(4,), seed=12)
    loss = build_distill_loss("crd=1", 4, 4, kd_temperature=4.0).double()
    out, _ = run_module(loss, sv, st, 8.0, tvs, tts, [50.0])
    zs_i2t, zt_i2t = 8.0 * n_(sv) @ n_(st).T, 50.0 * tvs[0] @ tts[0].T
    kd = 16 * 0.5 * (kl(softmax_rows(zt_i2t / 4), zs_i2t / 4) + kl(softmax_rows(zt_i2t.T / 4), zs_i2t.T / 4))
    assert out["crd"].item() == pytest.approx(kd, rel=1e-10)


def test_weight_zero_terms_do_no_work(monkeypatch):
    calls = {}
    for name in ("task", "crd", "fd", "icl", "xkd", "gd", "afd", "afd_fuse", "sim", "emb", "teacher_targets"):
        fn = getattr(T, name)

        def wrapped(*a, _fn=fn, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*a, **k)
        monkeypatch.setattr(T, name, wrapped)
    spec = "task=1,fd=2000@warmup:10:20,icl=1@from:10,xkd=1@from:10,gd=1@from:10,afd=1@from:10,sim=1@from:10," \
           "emb=1@from:10,crd=1@from:10"
    loss = build_distill_loss(spec, 6, 8)
    proj_calls = []
    for m in (loss.proj_image, loss.proj_text, loss.afd_fuse_image, loss.afd_fuse_text):
        m.register_forward_hook(lambda *a: proj_calls.append(1))
    sv, st, tvs, tts = rand_inputs(d_s=6, d_t=(8,))
    args = dict(student_image=torch.tensor(sv).float(), student_text=torch.tensor(st).float(),
                student_scale=torch.tensor(10.0), teacher_image=torch.tensor(tvs[0]).float(),
                teacher_text=torch.tensor(tts[0]).float(), teacher_scale=torch.tensor(50.0))
    out = loss(**args, step=9)
    assert set(out) == {"task", "total"}
    assert calls == {"task": 1} and not proj_calls
    assert loss.effective_weights(9)["fd"] == 0 and loss.effective_weights(15)["fd"] == pytest.approx(1000)
    calls.clear()
    out = loss(**args, step=15)
    assert set(out) == set(loss.schedules) | {"total"}
    assert calls["gd"] == 1 and calls["teacher_targets"] == 1 and proj_calls  # targets shared by crd and xkd
    unweighted = build_distill_loss("fd=1", 6, 8)(**args)["fd"]  # same seed -> same projections
    assert out["fd"].item() == pytest.approx(1000 * unweighted.item(), rel=1e-6)
    # a constant-0 term has no parameters at all
    assert build_distill_loss("task=1,afd=0", 6, 8).afd_fuse_image is None


def test_auto_balance_uncertainty():
    sv, st, tvs, tts = rand_inputs(d_s=3, d_t=(5,), seed=4)
    plain = build_distill_loss("task=1,fd=10", 3, 5).double()
    auto = build_distill_loss("task=1,fd=10", 3, 5, auto_balance="uncertainty").double()
    with torch.no_grad():
        auto.log_vars["fd"].fill_(0.7)
    o_p, _ = run_module(plain, sv, st, 5.0, tvs, tts, [50.0])
    o_a, _ = run_module(auto, sv, st, 5.0, tvs, tts, [50.0])
    expect = 0.5 * o_p["task"] + 0.5 * math.exp(-0.7) * o_p["fd"] + 0.5 * 0.7
    assert o_a["total"].item() == pytest.approx(expect.item(), rel=1e-12)
    assert auto.effective_weights(0) == pytest.approx({"task": 0.5, "fd": 10 * 0.5 * math.exp(-0.7)})
    o_a["total"].backward()
    # d/ds [½ e^{-s} L + ½ s] = ½ - ½ e^{-s} L
    assert auto.log_vars["fd"].grad.item() == pytest.approx(0.5 - 0.5 * math.exp(-0.7) * o_p["fd"].item(), rel=1e-9)
    assert "log_vars.fd" in auto.no_weight_decay_names()


def test_state_dict_round_trip_and_param_groups():
    a = build_distill_loss("task=1,icl=1,fd=1,afd=1", 6, 8, auto_balance="uncertainty", seed=1)
    b = build_distill_loss("task=1,icl=1,fd=1,afd=1", 6, 8, auto_balance="uncertainty", seed=2)
    assert not torch.equal(a.proj_image.weight, b.proj_image.weight)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.25)
    b.load_state_dict(a.state_dict())
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    no_wd = a.no_weight_decay_names()
    assert {"icl_logit_scale", "afd_logit_scale", "log_vars.task", "proj_image.bias"} <= no_wd
    assert "proj_image.weight" not in no_wd
    groups = a.param_groups(0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(a.parameters()))
    assert all(g["weight_decay"] == 0.0 for g in groups if any(p.ndim < 2 for p in g["params"]))
    # same seed -> identical parameters without any communication
    c = build_distill_loss("task=1,icl=1,fd=1,afd=1", 6, 8, auto_balance="uncertainty", seed=1)
    d = build_distill_loss("task=1,icl=1,fd=1,afd=1", 6, 8, auto_balance="uncertainty", seed=1)
    assert all(torch.equal(p, q) for p, q in zip(c.parameters(), d.parameters()))


def test_scales_are_clamped_and_flags():
    loss = build_distill_loss("task=1,icl=1", 4, 4)
    with torch.no_grad():  # the log-space parameter is clamped after each step (as open_clip's logit_scale)
        loss.icl_logit_scale.fill_(10.0)
    loss.clamp_scales_()
    assert loss.learned_scale("icl").item() == pytest.approx(100.0)
    with torch.no_grad():
        loss.icl_logit_scale.fill_(-3.0)
    loss.clamp_scales_()
    assert loss.learned_scale("icl").item() == 1.0
    assert loss.needs_teacher and not loss.needs_teacher_internals and loss.mask_ratio == 0.0
    only_task = build_distill_loss("task=1", 4)
    assert not only_task.needs_teacher and not only_task.needs_intermediates
    out = only_task(student_image=torch.randn(3, 4), student_text=torch.randn(3, 4), student_scale=torch.tensor(5.0))
    assert set(out) == {"task", "total"}
    mfd = build_distill_loss("task=1,mfd=1", 4, 4, mask_ratio=0.75)
    assert mfd.mask_ratio == 0.75
    feat = build_distill_loss("feat=1", 4, 4, feat_layers=[FeatPair("image", 0, 0, 4, 4)])
    assert feat.needs_teacher_internals and feat.needs_intermediates


def test_local_loss_single_process_equals_global():
    sv, st, tvs, tts = rand_inputs(g=5, d_s=3, d_t=(5,), seed=9)
    g_loss = build_distill_loss(ALL, 3, 5).double()
    l_loss = build_distill_loss(ALL, 3, 5, local_loss=True).double()
    o_g, _ = run_module(g_loss, sv, st, 5.0, tvs, tts, [50.0])
    o_l, _ = run_module(l_loss, sv, st, 5.0, tvs, tts, [50.0])
    for k in o_g:
        assert o_l[k].item() == pytest.approx(o_g[k].item(), rel=1e-12), k

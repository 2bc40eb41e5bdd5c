"""The sigmoid terms (task_siglip, sig_kd) against NumPy re-derivations of docs/losses.md (values and gradients),
open_clip's SigLipLoss, the worked example, chunk independence, the per-member teacher scale/bias options and
their one-line refusals."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.distill import build_distill_loss
from training.distill import terms as T
from training.errors import UsageError


def softplus(x):
    return np.logaddexp(0.0, x)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def normalize(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ref_sigmoid(sv, st, scale, bias, targets):
    """Value and gradients (raw student features, the scale multiplier, the bias) of
    (1/G)·Σ [softplus(X) − T·X], X = scale·n_v n_tᵀ + bias, derived by hand."""
    g = sv.shape[0]
    nv, nt = normalize(sv), normalize(st)
    sim = nv @ nt.T
    x = scale * sim + bias
    value = (softplus(x) - targets * x).sum() / g
    dx = (sigmoid(x) - targets) / g
    d_nv, d_nt = scale * dx @ nt, scale * dx.T @ nv

    def through_normalize(s, n, dn):
        return (dn - n * (n * dn).sum(1, keepdims=True)) / np.linalg.norm(s, axis=1, keepdims=True)

    return value, through_normalize(sv, nv, d_nv), through_normalize(st, nt, d_nt), (dx * sim).sum(), dx.sum()


def teacher_probs(tvs, tts, scales, biases):
    return np.mean([sigmoid(s * normalize(tv) @ normalize(tt).T + b) for tv, tt, s, b in zip(tvs, tts, scales, biases)],
                   axis=0)


def inputs(g=6, d_s=4, d_t=(5,), seed=0):
    rng = np.random.default_rng(seed)
    sv, st = rng.normal(size=(g, d_s)), rng.normal(size=(g, d_s))
    tvs = [normalize(rng.normal(size=(g, d))) for d in d_t]
    tts = [normalize(rng.normal(size=(g, d))) for d in d_t]
    return sv, st, tvs, tts


def t64(x, grad=False):
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


def test_worked_example_of_the_docs():
    sv, st = torch.tensor([[3.0, 4], [4, 3]]), torch.tensor([[2.0, 0], [0, 5]])
    tv, tt = torch.eye(2), F.normalize(torch.tensor([[1.0, 1], [0, 1]]), dim=-1)
    loss = build_distill_loss("task_siglip=1,sig_kd=1", 2, 2)  # loss-side scale/bias at SigLIP's init: 10, -10
    out = loss(sv, st, torch.tensor(1.0), tv, tt, torch.tensor(10.0), teacher_bias=torch.tensor(-5.0))
    assert out["task_siglip"].item() == pytest.approx(4.145078, abs=1e-5)
    assert out["sig_kd"].item() == pytest.approx(4.802563, abs=1e-5)
    ensemble = build_distill_loss("sig_kd=1", 2, [2, 2], teacher_logit_scales=[10, 20], teacher_logit_biases=[-5, -8])
    assert ensemble(sv, st, 1.0, [tv, tv], [tt, tt], [1.0, 1.0])["sig_kd"].item() == pytest.approx(4.970763, abs=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_task_siglip_value_and_gradients_vs_reference(chunk):
    sv, st, _, _ = inputs()
    loss = build_distill_loss("task_siglip=1", 4, sigmoid_chunk=chunk).double()
    assert math.exp(loss.siglip_logit_scale.item()) == pytest.approx(10.0) and loss.siglip_logit_bias.item() == -10.0
    with torch.no_grad():  # away from the init, so the gradients are not tiny
        loss.siglip_logit_scale.fill_(math.log(3.0))
        loss.siglip_logit_bias.fill_(-1.5)
    s_v, s_t = t64(sv, True), t64(st, True)
    out = loss(s_v, s_t, torch.tensor(1.0, dtype=torch.float64))["task_siglip"]
    out.backward()
    value, g_v, g_t, g_scale, g_bias = ref_sigmoid(sv, st, 3.0, -1.5, np.eye(6))
    assert out.item() == pytest.approx(value, rel=1e-12)
    np.testing.assert_allclose(s_v.grad.numpy(), g_v, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(s_t.grad.numpy(), g_t, rtol=1e-10, atol=1e-13)
    # the scale is stored in log space: d/dt' = t·d/dt
    assert loss.siglip_logit_scale.grad.item() == pytest.approx(3.0 * g_scale, rel=1e-10)
    assert loss.siglip_logit_bias.grad.item() == pytest.approx(g_bias, rel=1e-10)


@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_sig_kd_value_and_gradients_vs_reference_with_an_ensemble(chunk):
    sv, st, tvs, tts = inputs(d_t=(5, 3), seed=1)
    scales, biases = [7.0, 12.0], [-2.0, -6.0]
    loss = build_distill_loss("sig_kd=1", 4, [5, 3], sigmoid_chunk=chunk).double()
    s_v, s_t = t64(sv, True), t64(st, True)
    out = loss(s_v, s_t, 1.0, [t64(x) for x in tvs], [t64(x) for x in tts], [t64(s) for s in scales],
               teacher_bias=[t64(b) for b in biases])["sig_kd"]
    out.backward()
    q = teacher_probs(tvs, tts, scales, biases)
    scale = math.exp(loss.siglip_logit_scale.item())  # log 10 as stored (float32 at init)
    value, g_v, g_t, g_scale, g_bias = ref_sigmoid(sv, st, scale, loss.siglip_logit_bias.item(), q)
    assert out.item() == pytest.approx(value, rel=1e-12)
    np.testing.assert_allclose(s_v.grad.numpy(), g_v, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(s_t.grad.numpy(), g_t, rtol=1e-10, atol=1e-13)
    assert loss.siglip_logit_scale.grad.item() == pytest.approx(scale * g_scale, rel=1e-10)
    assert loss.siglip_logit_bias.grad.item() == pytest.approx(g_bias, rel=1e-10)
    # its KL form differs by the teachers' entropy, a constant
    entropy = -(q * np.log(q) + (1 - q) * np.log(1 - q)).sum() / 6
    kl = sum((qq * np.log(qq / p) + (1 - qq) * np.log((1 - qq) / (1 - p)))
             for qq, p in zip(q.ravel(), sigmoid(scale * normalize(sv) @ normalize(st).T - 10).ravel())) / 6
    assert value - entropy == pytest.approx(kl, rel=1e-10)


def test_a_siglip_student_uses_its_own_scale_and_bias_and_matches_open_clip():
    from open_clip.loss import SigLipLoss

    sv, st, _, _ = inputs(g=8, seed=2)
    loss = build_distill_loss("task_siglip=1", 4, student_logit_bias=True, sigmoid_chunk=3).double()
    assert loss.siglip_logit_scale is None and loss.siglip_logit_bias is None  # the student owns them
    log_scale, bias = t64(math.log(4.0), True), t64(-2.0, True)
    s_v, s_t = t64(sv, True), t64(st, True)
    ours = loss(s_v, s_t, log_scale.exp(), student_bias=bias)["task_siglip"]
    grads = torch.autograd.grad(ours, [s_v, s_t, log_scale, bias])
    s_v2, s_t2, log_scale2, bias2 = (x.detach().clone().requires_grad_(True) for x in (s_v, s_t, log_scale, bias))
    theirs = SigLipLoss()(F.normalize(s_v2, dim=-1), F.normalize(s_t2, dim=-1), log_scale2.exp(), bias2)
    ref = torch.autograd.grad(theirs, [s_v2, s_t2, log_scale2, bias2])
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="pass student_bias"):
        loss(s_v, s_t, log_scale.exp())
    with pytest.raises(ValueError, match="without a logit bias"):
        build_distill_loss("task_siglip=1", 4)(s_v, s_t, 1.0, student_bias=bias)


def test_chunked_autograd_function_passes_gradcheck():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    scale = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-0.4, dtype=torch.float64, requires_grad=True)
    q = torch.rand(5, 5, dtype=torch.float64, generator=gen)
    targets = lambda i0, i1: q[i0:i1]  # noqa: E731
    assert torch.autograd.gradcheck(lambda *x: T.sigmoid_pair_loss(*x, targets, chunk=2), (a, b, scale, bias))


def test_local_loss_single_process_equals_global():
    sv, st, tvs, tts = inputs(seed=4)
    args = (t64(sv), t64(st), 1.0, [t64(tvs[0])], [t64(tts[0])], [t64(9.0)])
    a = build_distill_loss("task_siglip=1,sig_kd=1", 4, 5).double()(*args, teacher_bias=t64(-3.0))
    b = build_distill_loss("task_siglip=1,sig_kd=1", 4, 5, local_loss=True).double()(*args, teacher_bias=t64(-3.0))
    torch.testing.assert_close(a["total"], b["total"], rtol=1e-12, atol=0)


def test_softmax_terms_take_the_per_member_scales_and_ignore_the_bias():
    sv, st, tvs, tts = inputs(d_t=(5, 3), seed=5)
    feats = (t64(sv), t64(st), t64(20.0), [t64(x) for x in tvs], [t64(x) for x in tts])
    own = build_distill_loss("crd=1", 4, [5, 3]).double()(*feats, [t64(70.0), t64(60.0)])["crd"]
    fixed = build_distill_loss("crd=1", 4, [5, 3], teacher_logit_scales=[70, 60]).double()(
        *feats, [t64(1.0), t64(1.0)], teacher_bias=[t64(-10.0), None])["crd"]
    swapped = build_distill_loss("crd=1", 4, [5, 3], teacher_logit_scales=[60, 70]).double()(*feats, [1.0, 1.0])["crd"]
    torch.testing.assert_close(own, fixed, rtol=1e-12, atol=0)
    assert abs(swapped.item() - own.item()) > 1e-6  # each member keeps its own scale


def test_options_are_checked():
    from training.distill import DistillSpecError

    with pytest.raises(DistillSpecError, match="one per member"):
        build_distill_loss("sig_kd=1", 4, [5, 3], teacher_logit_biases=[-10])
    with pytest.raises(DistillSpecError, match="once"):
        build_distill_loss("crd=1", 4, 5, teacher_logit_scale=50, teacher_logit_scales=[70])
    with pytest.raises(DistillSpecError, match="sigmoid chunk"):
        build_distill_loss("task_siglip=1", 4, sigmoid_chunk=0)
    sv, st, tvs, tts = inputs()
    with pytest.raises(ValueError, match="logit bias"):  # a CLIP teacher: no bias, none given
        build_distill_loss("sig_kd=1", 4, 5)(t64(sv), t64(st), 1.0, t64(tvs[0]), t64(tts[0]), t64(10.0))


def test_loss_side_sigmoid_parameters_clamp_and_skip_weight_decay():
    loss = build_distill_loss("task_siglip=1", 4)
    assert {"siglip_logit_scale", "siglip_logit_bias"} <= loss.no_weight_decay_names()
    with torch.no_grad():
        loss.siglip_logit_scale.fill_(9.0)
    loss.clamp_scales_()
    assert loss.siglip_logit_scale.item() == pytest.approx(math.log(100.0))
    compat = build_distill_loss("task_siglip=1,icl=1", 4, 5, compat="clipkd")
    with torch.no_grad():
        compat.siglip_logit_scale.fill_(9.0)
        compat.icl_logit_scale.fill_(9.0)
    compat.clamp_scales_()  # compat keeps CLIP-KD's raw icl multiplier unclamped, not the sigmoid scale
    assert compat.siglip_logit_scale.item() == pytest.approx(math.log(100.0)) and compat.icl_logit_scale.item() == 9.0


def test_cli_refuses_bad_member_values_in_one_line():
    from training.params import parse_config

    base = ["--model", "tiny-student", "--teacher", "tiny-teacher,tiny-sigmoid", "--train-data", "x.csv"]
    with pytest.raises(UsageError, match="lists 1 value"):
        parse_config(base + ["--teacher-logit-scales", "70"])
    with pytest.raises(UsageError, match="comma-separated numbers"):
        parse_config(base + ["--teacher-logit-biases", "a,b"])
    with pytest.raises(UsageError, match="give one"):
        parse_config(base + ["--teacher-logit-scales", "70,60", "--teacher-logit-scale", "50"])

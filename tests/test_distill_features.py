"""Model-side features: masked (mfd) student image forward and intermediate tokens (feat) on open_clip ViT, text,
timm and ModifiedResNet towers, and the end-to-end feat/mfd losses on the shipped tiny configs."""

import open_clip
import pytest
import torch
from open_clip.modified_resnet import ModifiedResNet

import training  # noqa: F401  (registers the shipped model configs)
from training.distill import DistillSpecError, build_distill_loss, create_distill_loss
from training.distill.features import default_pairs, resolve_feat_pairs
from training.models.towers import (
    check_masking_supported,
    encode_image_with_options,
    encode_text_with_options,
    forward_features,
    mask_tokens,
    tower_widths,
)
from training.params import parse_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: open_clip.create_model(name) for name in ("tiny-student", "tiny-teacher", "tiny-student-rn")}


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 64, 64, generator=gen), torch.randint(1, 49407, (4, 24), generator=gen)


def test_mask_tokens_is_per_sample_random_and_keeps_the_class_token():
    b, n, c = 8, 16, 2
    x = torch.arange(1 + n, dtype=torch.float32).view(1, -1, 1).expand(b, -1, c).contiguous()
    out = mask_tokens(x, 0.75, torch.Generator().manual_seed(3))
    assert out.shape == (b, 1 + 4, c)
    assert torch.all(out[:, 0] == 0)  # class token first, always kept
    kept = out[:, 1:, 0]
    assert torch.all(kept[:, 1:] > kept[:, :-1])  # original order, no duplicates
    assert len({tuple(row.tolist()) for row in kept}) > 1  # different subsets per sample
    again = mask_tokens(x, 0.75, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)


def test_masked_vit_forward(models, batch):
    student, teacher = models["tiny-student"], models["tiny-teacher"]
    image, _ = batch
    visual = student.visual
    seen = []
    hook = visual.transformer.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    full, _ = encode_image_with_options(visual, image)
    masked_a, _ = encode_image_with_options(visual, image, 0.5, generator=torch.Generator().manual_seed(1))
    masked_b, _ = encode_image_with_options(visual, image, 0.5, generator=torch.Generator().manual_seed(2))
    masked_a2, _ = encode_image_with_options(visual, image, 0.5, generator=torch.Generator().manual_seed(1))
    hook.remove()
    assert seen == [1 + 16, 1 + 8, 1 + 8, 1 + 8]  # one forward each, (1 - r) of the 16 patches kept
    torch.testing.assert_close(full, student.encode_image(image))
    assert not torch.allclose(full, masked_a, atol=1e-4)  # masking changes the student's features
    assert not torch.allclose(masked_a, masked_b, atol=1e-4)  # random
    torch.testing.assert_close(masked_a, masked_a2)  # reproducible with a generator
    assert isinstance(visual.patch_dropout, torch.nn.Identity)  # the tower is left as it was
    # the teacher (unmasked) gives the same features every time
    t1, _ = encode_image_with_options(teacher.visual, image)
    t2, _ = encode_image_with_options(teacher.visual, image)
    torch.testing.assert_close(t1, t2, rtol=0, atol=0)
    torch.testing.assert_close(t1, teacher.encode_image(image))
    with pytest.raises(DistillSpecError, match="unmasked"):
        encode_image_with_options(visual, image, 0.5, layers=[0])


def test_mfd_end_to_end(models, batch):
    student, teacher = models["tiny-student"], models["tiny-teacher"]
    image, text = batch
    loss = build_distill_loss("task=1,fd=1,mfd=1", 64, 128, mask_ratio=0.5)
    assert loss.mask_ratio == 0.5
    out = forward_features(student, image, text, mask_ratio=loss.mask_ratio)
    full = forward_features(student, image, None)
    with torch.no_grad():
        t = forward_features(teacher, image, torch.randint(1, 49407, (4, 32)))
    res = loss(student_image=full["image_features"], student_text=out["text_features"],
               student_scale=out["logit_scale"], teacher_image=t["image_features"].div(
                   t["image_features"].norm(dim=-1, keepdim=True)),
               teacher_text=torch.nn.functional.normalize(t["text_features"], dim=-1),
               teacher_scale=t["logit_scale"], student_image_masked=out["image_features"])
    assert res["mfd"].item() != pytest.approx(res["fd"].item(), rel=1e-6)
    student.zero_grad()
    res["mfd"].backward()
    assert student.visual.conv1.weight.grad.abs().sum() > 0


def test_non_vit_students_cannot_be_masked(models, batch):
    image, _ = batch
    with pytest.raises(DistillSpecError, match=r"ViT student image tower.*TimmModel \(timm 'resnet18'\)"):
        encode_image_with_options(models["tiny-student-rn"].visual, image, 0.5)
    rn = ModifiedResNet((1, 1, 1, 1), 32, heads=2, image_size=64, width=8)
    with pytest.raises(DistillSpecError, match="ModifiedResNet"):
        check_masking_supported(rn)
    check_masking_supported(models["tiny-student"].visual)  # ViT: fine


def test_vit_and_text_intermediates(models, batch):
    student = models["tiny-student"]
    image, text = batch
    feats, tokens = encode_image_with_options(student.visual, image, layers=[1, 0, -1])
    ref = student.visual.forward_intermediates(image, indices=[0, 1], normalize_intermediates=True,
                                               output_fmt="NLC")
    torch.testing.assert_close(feats, student.encode_image(image))
    assert [t.shape for t in tokens] == [(4, 16, 64)] * 3
    torch.testing.assert_close(tokens[0], ref["image_intermediates"][1])
    torch.testing.assert_close(tokens[1], ref["image_intermediates"][0])
    torch.testing.assert_close(tokens[2], tokens[0])
    t_feats, t_tokens = encode_text_with_options(student, text, layers=[1])
    torch.testing.assert_close(t_feats, student.encode_text(text))
    ref = student.forward_intermediates(text=text, text_indices=[1], normalize_intermediates=True)
    torch.testing.assert_close(t_tokens[0], ref["text_intermediates"][0])
    assert t_tokens[0].shape == (4, 24, 64)
    with pytest.raises(DistillSpecError, match="out of range"):
        encode_text_with_options(student, text, layers=[2])


def test_timm_and_modified_resnet_intermediates(models, batch):
    image, _ = batch
    visual = models["tiny-student-rn"].visual.eval()
    feats, tokens = encode_image_with_options(visual, image, layers=[4, 2])
    torch.testing.assert_close(feats, visual(image))
    assert [t.shape for t in tokens] == [(4, 4, 512), (4, 64, 128)]  # NCHW maps flattened to [B, H*W, C]
    assert tower_widths(visual, "image") == [64, 64, 128, 256, 512]
    visual.train()
    rn = ModifiedResNet((1, 1, 1, 1), 32, heads=2, image_size=64, width=8).eval()
    feats, tokens = encode_image_with_options(rn, image, layers=[0, 4])
    torch.testing.assert_close(feats, rn(image))
    assert [t.shape[1:] for t in tokens] == [(256, 8), (4, 256)]
    assert tower_widths(rn, "image") == [8, 32, 64, 128, 256]


def test_resolve_feat_pairs(models):
    s, t, rn = models["tiny-student"], models["tiny-teacher"], models["tiny-student-rn"]
    assert default_pairs(2, 4) == [(0, 1), (1, 3)] and default_pairs(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    pairs = resolve_feat_pairs(s, t)
    assert [(p.tower, p.student_layer, p.teacher_layer, p.student_width, p.teacher_width) for p in pairs] == [
        ("image", 0, 1, 64, 128), ("image", 1, 3, 64, 128), ("text", 0, 1, 64, 128), ("text", 1, 3, 64, 128)]
    pairs = resolve_feat_pairs(rn, t, "image:-1:-1,text:0:2")
    assert [(p.tower, p.student_layer, p.teacher_layer, p.student_width) for p in pairs] == [
        ("image", 4, 3, 512), ("text", 0, 2, 64)]
    with pytest.raises(DistillSpecError, match="layer 5 out of range"):
        resolve_feat_pairs(s, t, "0:5")


@pytest.mark.parametrize("student_name", ["tiny-student", "tiny-student-rn"])
def test_feat_end_to_end(models, batch, student_name):
    student, teacher = models[student_name], models["tiny-teacher"]
    image, text = batch
    args = parse_config(["--distill", "task=1,feat=1"])
    loss = create_distill_loss(args.distill, 64, 128, seed=0, student_model=student, teacher_model=teacher)
    assert loss.needs_intermediates and loss.needs_teacher_internals
    s_layers, t_layers = loss.feat_layers_for("student"), loss.feat_layers_for("teacher")
    s = forward_features(student, image, text, image_layers=s_layers["image"], text_layers=s_layers["text"])
    with torch.no_grad():
        t = forward_features(teacher, image, torch.randint(1, 49407, (4, 32)), image_layers=t_layers["image"],
                             text_layers=t_layers["text"])
    norm = torch.nn.functional.normalize
    student.zero_grad()
    out = loss(student_image=s["image_features"], student_text=s["text_features"], student_scale=s["logit_scale"],
               teacher_image=norm(t["image_features"], dim=-1), teacher_text=norm(t["text_features"], dim=-1),
               teacher_scale=t["logit_scale"],
               student_intermediates={"image": s["image_intermediates"], "text": s["text_intermediates"]},
               teacher_intermediates={"image": t["image_intermediates"], "text": t["text_intermediates"]})
    assert torch.isfinite(out["feat"]) and out["feat"].item() > 0
    out["feat"].backward()
    assert student.transformer.resblocks[0].mlp.c_fc.weight.grad.abs().sum() > 0  # text tower
    first_image_param = next(student.visual.parameters())
    assert first_image_param.grad is not None and first_image_param.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in loss.feat_proj.parameters())

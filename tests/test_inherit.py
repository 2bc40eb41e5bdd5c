"""Weight inheritance (--init-from-teacher): every student tensor against an independent NumPy re-derivation of the
teacher slice it must hold; one-line refusals; the real CLI path, and --resume winning over the init."""

import re

import numpy as np
import open_clip
import pytest
import torch

import training  # noqa: F401  (registers the tiny configs)
from helpers import kd_world
from training.main import main
from training.models.inherit import InheritanceError, choose_layers, inherit_weights

# teacher: 3 heads of width 32 per tower, 5 layers; student: 2 heads of width 24 (image) / 16 (text), 2 layers, so a
# per-head slice differs from a plain leading slice of the fused qkv
TEACHER = dict(embed_dim=48, vision_cfg=dict(image_size=32, layers=5, width=96, head_width=32, patch_size=8,
                                             mlp_ratio=4.0),
               text_cfg=dict(context_length=16, vocab_size=1000, width=96, heads=3, layers=5))
STUDENT = dict(embed_dim=40, vision_cfg=dict(image_size=32, layers=2, width=48, head_width=24, patch_size=8,
                                             mlp_ratio=2.0),
               text_cfg=dict(context_length=12, vocab_size=1000, width=32, heads=2, layers=2))


def clip(cfg, custom_text=False, seed=0):
    torch.manual_seed(seed)
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    return cls(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])


def heads_and_width(cfg, tower):
    if tower == "image":
        v = cfg["vision_cfg"]
        return v["width"] // v["head_width"], v["head_width"]
    t = cfg["text_cfg"]
    return t["heads"], t["width"] // t["heads"]


def expected_tensor(key, teacher_sd, layers, teacher_cfg, student_cfg, shape):
    """The teacher slice student tensor `key` must hold, derived with explicit index lists."""
    match = re.match(r"^(visual\.transformer\.resblocks|text\.transformer\.resblocks|transformer\.resblocks)\.(\d+)\.(.*)",
                     key)
    tower = None
    source_key = key
    if match:
        tower = "image" if match.group(1).startswith("visual") else "text"
        source_key = f"{match.group(1)}.{layers[tower][int(match.group(2))]}.{match.group(3)}"
    t = teacher_sd[source_key].numpy()
    if tower and key.endswith(("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight")):
        heads_t, d_t = heads_and_width(teacher_cfg, tower)
        heads_s, d_s = heads_and_width(student_cfg, tower)
        per_head = [h * d_t + j for h in range(heads_s) for j in range(d_s)]  # within one of q, k, v
        if key.endswith("out_proj.weight"):
            return t[:shape[0]][:, per_head]
        rows = [part * heads_t * d_t + i for part in range(3) for i in per_head]
        return t[rows] if t.ndim == 1 else t[rows][:, :shape[1]]
    out = t
    for dim, n in enumerate(shape):  # leading slice, one dimension at a time
        out = np.take(out, np.arange(n), axis=dim)
    return out


@pytest.mark.parametrize("custom_text", [False, True])
@pytest.mark.parametrize("spec,image_layers,text_layers", [
    (("auto", "auto"), [0, 2], [0, 2]),
    (("1,4", "every:3"), [1, 4], [0, 3]),
])
def test_every_student_tensor_is_its_teacher_slice(custom_text, spec, image_layers, text_layers):
    teacher, student = clip(TEACHER, custom_text, seed=1), clip(STUDENT, custom_text, seed=2)
    layers = inherit_weights(student, teacher, *spec)
    assert layers == {"image": image_layers, "text": text_layers}
    teacher_sd = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    student_sd = student.state_dict()
    assert any(k.startswith("text.") for k in student_sd) == custom_text
    for key, value in student_sd.items():
        want = expected_tensor(key, teacher_sd, layers, TEACHER, STUDENT, tuple(value.shape))
        assert want.shape == tuple(value.shape), key
        np.testing.assert_array_equal(value.numpy(), want, err_msg=key)
    # the per-head qkv slice is not the leading slice (the check above would not see a leading-slice bug otherwise)
    qkv = student_sd["visual.transformer.resblocks.0.attn.in_proj_weight"]
    leading = teacher_sd[f"visual.transformer.resblocks.{image_layers[0]}.attn.in_proj_weight"][:qkv.shape[0],
                                                                                                 :qkv.shape[1]]
    assert not torch.equal(qkv, leading)


def test_a_student_of_the_teacher_architecture_becomes_the_teacher():
    teacher, student = clip(TEACHER, seed=1), clip(TEACHER, seed=2)
    inherit_weights(student, teacher)
    for key, value in teacher.state_dict().items():
        assert torch.equal(student.state_dict()[key], value), key
    image, text = torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2, 16))
    torch.testing.assert_close(student.encode_image(image), teacher.encode_image(image), rtol=0, atol=0)
    torch.testing.assert_close(student.encode_text(text), teacher.encode_text(text), rtol=0, atol=0)


def _one_line_error(student_cfg, teacher_cfg=TEACHER, **specs):
    with pytest.raises(InheritanceError) as info:
        inherit_weights(clip(student_cfg), clip(teacher_cfg), **specs)
    message = str(info.value)
    assert "\n" not in message and message.startswith("--init-from-teacher: ")
    return message


def _with(cfg, tower, **changes):
    key = "vision_cfg" if tower == "image" else "text_cfg"
    return {**cfg, key: {**cfg[key], **changes}}


@pytest.mark.parametrize("student_cfg,tensor,reason", [
    (_with(STUDENT, "image", image_size=16, patch_size=4), "visual.conv1.weight", "patch size"),
    (_with(STUDENT, "image", image_size=64), "visual.positional_embedding", "number of image tokens"),
    (_with(STUDENT, "text", vocab_size=500), "token_embedding.weight", "vocabulary"),
    (_with(STUDENT, "text", context_length=20), "positional_embedding", "exceeds"),
    ({**STUDENT, "embed_dim": 64}, "text_projection", "exceeds"),
    (_with(STUDENT, "image", mlp_ratio=9.0), "visual.transformer.resblocks.0.mlp.c_fc.weight", "exceeds"),
    (_with(STUDENT, "image", width=128, head_width=32), "visual.class_embedding", "exceeds"),
    (_with(STUDENT, "text", width=64, heads=1), "transformer.resblocks.0.attn.in_proj_weight", "1 heads of width 64"),
])
def test_a_shape_that_cannot_be_inherited_is_one_line_naming_the_tensor(student_cfg, tensor, reason):
    message = _one_line_error(student_cfg)
    assert f"cannot inherit {tensor}:" in message and reason in message


@pytest.mark.parametrize("specs,message", [
    (dict(image_layers="every:1"), "keeps 5 of the teacher's 5 layers (0,1,2,3,4) but the student has 2"),
    (dict(text_layers="0,5"), "text tower: teacher layer 5 does not exist"),
    (dict(image_layers="0,1,2"), "keeps 3 of the teacher's 5 layers"),
])
def test_layer_choices_that_do_not_fit_are_one_line(specs, message):
    assert message in _one_line_error(STUDENT, **specs)


def test_layer_spec_auto_is_every_kth_when_it_divides():
    assert choose_layers("auto", 12, 6) == choose_layers("every:2", 12, 6) == [0, 2, 4, 6, 8, 10]
    assert choose_layers(None, 12, 4) == [0, 3, 6, 9]
    assert choose_layers("auto", 5, 3) == [0, 1, 3]
    assert choose_layers("auto", 4, 4) == [0, 1, 2, 3]


def test_other_families_are_refused_in_one_line():
    rn = open_clip.create_model("tiny-student-rn")
    vit = clip(STUDENT)
    for student, teacher, who in ((vit, rn, "teacher"), (rn, clip(TEACHER), "student")):
        with pytest.raises(InheritanceError) as info:
            inherit_weights(student, teacher)
        message = str(info.value)
        assert "\n" not in message and f"the {who}'s image tower is TimmModel" in message


# ---- the real CLI ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(module_tmp_path):
    return kd_world(module_tmp_path, n=16)


def _argv(world, name, *extra):
    return ["--model", "tiny-student-p8", "--teacher", "tiny-teacher", "--teacher-pretrained", world["teacher"],
            "--train-data", world["csv"], "--data-root", world["data_root"], "--batch-size", "8", "--epochs", "1",
            "--warmup", "1", "--precision", "fp32", "--workers", "0", "--logs", str(world["root"] / "logs"),
            "--name", name, "--zeroshot-frequency", "0", "--val-frequency", "0", "--device", "cpu",
            "--distill", "task=1", *extra]


def _model(world, name, filename):
    path = world["root"] / "logs" / name / "checkpoints" / filename
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _teacher_state(world):
    return torch.load(world["teacher"], map_location="cpu", weights_only=True)


def test_the_cli_starts_the_student_from_the_teacher(world):
    # one step at a negligible learning rate: the saved student is the init to within 1e-6
    argv = ("--max-steps", "1", "--lr", "1e-9", "--wd", "0")
    assert main(_argv(world, "inherited", "--init-from-teacher", "--inherit-image-layers", "1,3", *argv)) == 0
    assert main(_argv(world, "random", *argv)) == 0
    inherited, random_init = _model(world, "inherited", "step_1.pt"), _model(world, "random", "step_1.pt")
    teacher_sd = _teacher_state(world)
    student_cfg = open_clip.get_model_config("tiny-student-p8")
    teacher_cfg = open_clip.get_model_config("tiny-teacher")
    layers = {"image": [1, 3], "text": [0, 2]}
    for key, value in inherited.items():
        want = expected_tensor(key, teacher_sd, layers, teacher_cfg, student_cfg, tuple(value.shape))
        np.testing.assert_allclose(value.numpy(), want, rtol=0, atol=1e-6, err_msg=key)
        if value.ndim >= 2:  # the randomly initialised student fails the same check (norms start at 1 and 0 in both)
            assert not np.allclose(random_init[key].numpy(), want, atol=1e-3), key


def test_a_resumed_run_keeps_the_checkpoint_weights(world):
    common = ("--lr", "1e-3",)  # 2 steps per epoch
    assert main(_argv(world, "straight", "--max-steps", "2", *common)) == 0
    assert main(_argv(world, "resumed", "--max-steps", "1", *common)) == 0
    assert main(_argv(world, "resumed", "--max-steps", "2", "--resume", "latest", "--init-from-teacher",
                      *common)) == 0
    straight, resumed = _model(world, "straight", "epoch_1.pt"), _model(world, "resumed", "epoch_1.pt")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


@pytest.mark.parametrize("extra,message", [
    (["--init-from-teacher"], "--init-from-teacher needs --teacher"),
    (["--inherit-layers", "auto"], "--inherit-layers needs --init-from-teacher"),
    (["--teacher", "tiny-teacher", "--init-from-teacher", "--inherit-text-layers", "every:x"],
     "--inherit-text-layers"),
    (["--teacher", "tiny-teacher", "--init-from-teacher", "--inherit-layers", "3,1"], "must be increasing"),
])
def test_bad_inheritance_flags_exit_2_with_one_line(capsys, extra, message):
    assert main([*extra, "--device", "cpu", "--logs", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_the_cli_refuses_a_student_the_teacher_cannot_give(world, capsys):
    argv = _argv(world, "wrong", "--init-from-teacher", "--max-steps", "1")
    argv[argv.index("tiny-student-p8")] = "tiny-student"  # patch 16 against the teacher's 8
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot inherit visual.positional_embedding" in err[0], err


def test_with_a_teacher_cache_the_student_inherits_from_the_teacher_weights(world, capsys):
    from training import cache_teacher

    cache = str(world["root"] / "cache")
    assert cache_teacher.main(["--teacher", "tiny-teacher", "--teacher-pretrained", world["teacher"], "--train-data",
                               world["csv"], "--data-root", world["data_root"], "--views", "1", "--out", cache,
                               "--batch-size", "8", "--workers", "0", "--device", "cpu"]) == 0
    argv = _argv(world, "cached", "--init-from-teacher", "--teacher-cache", cache, "--max-steps", "1", "--lr", "1e-9",
                 "--wd", "0")
    assert main(argv) == 0
    inherited, teacher_sd = _model(world, "cached", "step_1.pt"), _teacher_state(world)
    layers = {"image": [0, 2], "text": [0, 2]}
    student_cfg, teacher_cfg = open_clip.get_model_config("tiny-student-p8"), open_clip.get_model_config("tiny-teacher")
    for key, value in inherited.items():
        want = expected_tensor(key, teacher_sd, layers, teacher_cfg, student_cfg, tuple(value.shape))
        np.testing.assert_allclose(value.numpy(), want, rtol=0, atol=1e-6, err_msg=key)
    # without the teacher's weights there is nothing to inherit from: one line
    no_weights = argv[:]
    at = no_weights.index("--teacher-pretrained")
    del no_weights[at:at + 2]
    no_weights[no_weights.index("cached")] = "cached-no-weights"
    capsys.readouterr()
    assert main(no_weights) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give --teacher and --teacher-pretrained" in err[0], err

"""Shipped configs build and run; checkpoints load in every common format; the teacher is frozen."""

import argparse
import json
import os

import open_clip
import pytest
import torch

import training  # noqa: F401  (registers the project's model configs)
from training.models import Teacher, create_clip, load_weights, lock_towers, read_state_dict, resolve_model_name
from training.params import UsageError, parse_config

SHIPPED = ["ViT-T-16", "timm-resnet18", "timm-mobilevit_s", "timm-swin_tiny_patch4_window7_224",
           "timm-mobilenetv3_small_100", "timm-efficientnet_b0"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_students_build_and_run(name):
    model = open_clip.create_model(name)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    tokens = open_clip.get_tokenizer(name)(["a photo of a cat"])
    with torch.no_grad():
        img = model.encode_image(torch.randn(1, 3, size, size))
        txt = model.encode_text(tokens)
    assert img.shape == txt.shape == (1, 512)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()


def test_vit_t_16_matches_clip_kd_shape():
    cfg = open_clip.get_model_config("ViT-T-16")
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    assert (v["layers"], v["width"], v["width"] // v["head_width"], v["patch_size"]) == (12, 192, 3, 16)
    assert (t["layers"], t["width"], t["heads"], cfg["embed_dim"]) == (12, 384, 6, 512)


def _sd(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("fmt", ["bare", "state_dict", "module", "model", "safetensors"])
def test_checkpoint_formats_load(tmp_path, fmt):
    src = create_clip("tiny-student", None, torch.device("cpu"))
    sd = _sd(src)
    path = str(tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pt"))
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        obj = {"bare": sd, "state_dict": {"state_dict": sd, "epoch": 3},
               "module": {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
               "model": {"model": sd, "step": 1}}[fmt]
        torch.save(obj, path)
    torch.manual_seed(123)
    dst = create_clip("tiny-student", path, torch.device("cpu"))
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_pickled_code_is_refused(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": argparse.Namespace(a=1)}, path)
    with pytest.raises(UsageError, match="cannot read checkpoint"):
        read_state_dict(path)


def test_bad_model_and_checkpoint_errors(tmp_path):
    with pytest.raises(UsageError, match="unknown model 'ViT-T-61'.*ViT-T-16"):
        resolve_model_name("ViT-T-61")
    garbage = tmp_path / "g.pt"
    garbage.write_bytes(b"not a checkpoint")
    model = create_clip("tiny-student", None, torch.device("cpu"))
    with pytest.raises(UsageError, match="cannot read checkpoint"):
        load_weights(model, str(garbage))
    wrong = tmp_path / "wrong.pt"
    torch.save(create_clip("tiny-teacher", None, torch.device("cpu")).state_dict(), wrong)
    with pytest.raises(UsageError, match="does not match"):
        load_weights(model, str(wrong))


def test_json_config_is_registered(tmp_path):
    cfg = open_clip.get_model_config("tiny-student")
    path = tmp_path / "my_student.json"
    path.write_text(json.dumps(cfg))
    assert resolve_model_name(str(path)) == "my_student"
    assert "my_student" in open_clip.list_models()
    assert os.path.splitext(path.name)[0] == "my_student"


GOOD = json.dumps(open_clip.get_model_config("tiny-student"))


@pytest.mark.parametrize("stem, content, message", [
    ("truncated", GOOD[:40], "is not valid JSON"),
    ("empty", "", "is not valid JSON"),
    ("a_list", "[1, 2]", "expected a JSON object, got list"),
    ("a_number", "3", "expected a JSON object, got int"),
    ("no_text", json.dumps({"embed_dim": 64, "vision_cfg": {}}), "lacks text_cfg"),
    ("tiny-teacher", json.dumps({"embed_dim": 64}), "lacks vision_cfg, text_cfg"),  # shadows a known config
    ("bad_types", json.dumps({"embed_dim": 64, "vision_cfg": [], "text_cfg": {}}), "vision_cfg must be an object"),
    ("latin1", b"\xff\xfe{", "cannot read"),
])
def test_bad_json_configs_give_one_line_naming_the_file(tmp_path, stem, content, message):
    path = tmp_path / f"{stem}.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UsageError) as info:
        resolve_model_name(str(path))
    msg = str(info.value)
    assert str(path) in msg and message in msg and "\n" not in msg, msg
    # the bad file is not left registered: later configs still register and the shadowed name is untouched
    assert open_clip.get_model_config("tiny-teacher")["embed_dim"] == 128
    good = tmp_path / "fine_student.json"
    good.write_text(GOOD)
    assert resolve_model_name(str(good)) == "fine_student"


def test_missing_or_unreadable_json_config(tmp_path):
    with pytest.raises(UsageError, match="model config not found: .*nope.json"):
        resolve_model_name(str(tmp_path / "nope.json"))
    (tmp_path / "adir.json").mkdir()
    with pytest.raises(UsageError, match="adir.json is not a file"):
        resolve_model_name(str(tmp_path / "adir.json"))


def _trainable(module):
    return {n for n, p in module.named_parameters() if p.requires_grad}


def test_lock_towers_follow_open_clip():
    def student(*flags):
        clip = create_clip("tiny-student", None, torch.device("cpu"))
        lock_towers(clip, parse_config(list(flags)).model)
        return clip

    everything = _trainable(create_clip("tiny-student", None, torch.device("cpu")))
    image = {n for n in everything if n.startswith("visual.")}
    assert _trainable(student()) == everything
    assert _trainable(student("--lock-image")) == everything - image
    # groups of open_clip's ViT: stem, blocks but the last, (last block + ln_post), proj
    assert _trainable(student("--lock-image", "--lock-image-unlocked-groups", "1")) == everything - image | {
        "visual.proj"}
    last = {n for n in image if n.startswith(("visual.transformer.resblocks.1.", "visual.ln_post.", "visual.proj"))}
    assert _trainable(student("--lock-image", "--lock-image-unlocked-groups", "2")) == everything - image | last
    text = everything - image - {"logit_scale"}
    assert _trainable(student("--lock-text")) == everything - text
    assert _trainable(student("--lock-text", "--lock-text-unlocked-layers", "1")) == everything - text | {
        "text_projection"}
    assert _trainable(student("--lock-image", "--lock-text")) == {"logit_scale"}


def test_lock_freeze_bn_stats_on_a_timm_tower():
    clip = create_clip("tiny-student-rn", None, torch.device("cpu"))
    lock_towers(clip, parse_config(["--lock-image", "--lock-image-freeze-bn-stats"]).model)
    assert not any(n.startswith("visual.trunk.") for n in _trainable(clip))
    assert "visual.head.proj.weight" in _trainable(clip)  # open_clip's timm lock freezes the trunk only
    bn = [m for m in clip.visual.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not bn  # replaced by FrozenBatchNorm2d: running stats no longer update in train mode


def test_a_tower_that_cannot_be_locked_gives_one_line(tmp_path):
    cfg = {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
           "text_cfg": open_clip.get_model_config("tiny-student")["text_cfg"]}
    path = tmp_path / "tiny_modified_resnet.json"
    path.write_text(json.dumps(cfg))
    clip = create_clip(str(path), None, torch.device("cpu"))
    with pytest.raises(UsageError) as info:
        lock_towers(clip, parse_config(["--lock-image", "--lock-image-unlocked-groups", "1"]).model)
    msg = str(info.value)
    assert "--lock-image" in msg and "ModifiedResNet" in msg and "partial locking" in msg and "\n" not in msg
    lock_towers(clip, parse_config(["--lock-image"]).model)  # the whole tower locks fine
    assert not any(n.startswith("visual.") for n in _trainable(clip))


def test_teacher_is_frozen_and_stays_in_eval():
    clip = create_clip("tiny-teacher", None, torch.device("cpu"))
    teacher = Teacher([clip])
    teacher.train()
    assert not teacher.training and not clip.training
    out = teacher(torch.randn(2, 3, 64, 64), torch.randint(0, 100, (2, 32)))
    for key in ("image_features", "text_features", "logit_scales"):  # inference_mode: no graph reaches the weights
        assert not out[key][0].requires_grad and out[key][0].grad_fn is None
    assert torch.allclose(out["image_features"][0].norm(dim=-1), torch.ones(2), atol=1e-5)

"""Shipped configs build and run; checkpoints load in every common format; the teacher is frozen."""

import argparse
import os

import open_clip
import pytest
import torch

import training  # noqa: F401  (registers the project's model configs)
from training.models import Teacher, create_clip, load_weights, read_state_dict, resolve_model_name
from training.params import UsageError

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
    import json

    path.write_text(json.dumps(cfg))
    assert resolve_model_name(str(path)) == "my_student"
    assert "my_student" in open_clip.list_models()
    assert os.path.splitext(path.name)[0] == "my_student"


def test_teacher_is_frozen_and_stays_in_eval():
    clip = create_clip("tiny-teacher", None, torch.device("cpu"))
    teacher = Teacher([clip])
    teacher.train()
    assert not teacher.training and not clip.training
    assert all(not p.requires_grad for p in teacher.parameters())
    out = teacher(torch.randn(2, 3, 64, 64), torch.randint(0, 100, (2, 32)))
    assert not out["image_features"][0].requires_grad
    assert torch.allclose(out["image_features"][0].norm(dim=-1), torch.ones(2), atol=1e-5)

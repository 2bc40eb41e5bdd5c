"""SigLIP models through the real CLI (python -m training.main's main): a SigLIP teacher with a CLIP student (softmax
terms use its scale, sig_kd its scale and bias), a CLIP teacher with a SigLIP student trained by task_siglip (its own
logit scale and bias learn; no loss-side copies), a mixed ensemble with per-member scales and biases, a SigLIP teacher
read from a teacher cache (the manifest records its bias), and the one-line refusal of sig_kd with a bias-less
teacher."""

import json
import math

import pytest
import torch

from helpers import write_image_csv
from training import cache_teacher
from training.main import main
from training.models import create_clip


@pytest.fixture(scope="module")
def world(module_tmp_path):
    root = module_tmp_path
    csv = write_image_csv(str(root / "data"), n=16, size=64)
    out = {"root": root, "csv": csv, "data_root": str(root / "data")}
    for name in ("tiny-teacher", "tiny-sigmoid"):
        torch.manual_seed(7)
        out[name] = str(root / f"{name}.pt")
        torch.save(create_clip(name, None, torch.device("cpu")).state_dict(), out[name])
    return out


def _argv(world, name, student, teachers, *extra):
    teacher = ["--teacher", ",".join(teachers), "--teacher-pretrained", ",".join(world[t] for t in teachers)] \
        if teachers else []
    return ["--model", student, *teacher, "--train-data", world["csv"], "--data-root", world["data_root"],
            "--batch-size", "8", "--epochs", "1", "--lr", "1e-2", "--warmup", "1", "--precision", "fp32",
            "--workers", "0", "--logs", str(world["root"] / "logs"), "--name", name, "--zeroshot-frequency", "0",
            "--val-frequency", "0", "--device", "cpu", "--seed", "3", *extra]


def _final(world, name):
    return torch.load(world["root"] / "logs" / name / "checkpoints" / "epoch_1.pt", weights_only=True)


def test_siglip_teacher_with_a_clip_student(world):
    assert main(_argv(world, "sig-teacher", "tiny-student", ["tiny-sigmoid"],
                      "--distill", "task=1,crd=1,sig_kd=1,fd=10")) == 0
    ckpt = _final(world, "sig-teacher")
    assert "logit_bias" not in ckpt["model"]
    # the sig_kd student side is the loss-side pair, initialised as SigLIP (log 10, -10) and trained
    assert abs(ckpt["loss"]["siglip_logit_bias"].item() + 10.0) > 1e-4
    assert abs(ckpt["loss"]["siglip_logit_scale"].item() - math.log(10.0)) > 1e-6


def test_clip_teacher_with_a_siglip_student(world):
    assert main(_argv(world, "sig-student", "tiny-sigmoid", ["tiny-teacher"], "--distill", "task_siglip=1,crd=1")) == 0
    ckpt = _final(world, "sig-student")
    assert "siglip_logit_bias" not in ckpt["loss"]  # the student's own scale and bias are the ones trained
    assert abs(ckpt["model"]["logit_bias"].item() + 10.0) > 1e-4


def test_siglip_student_alone_and_a_mixed_ensemble_with_per_member_scales(world):
    assert main(_argv(world, "sig-alone", "tiny-sigmoid", [], "--distill", "task_siglip=1", "--sigmoid-chunk",
                      "3")) == 0
    assert main(_argv(world, "sig-ensemble", "tiny-student", ["tiny-teacher", "tiny-sigmoid"],
                      "--distill", "task_siglip=1,crd=1,sig_kd=1", "--teacher-logit-scales", "70,60",
                      "--teacher-logit-biases=-12,-10")) == 0


def test_sig_kd_with_a_clip_teacher_needs_its_bias(world, capsys):
    assert main(_argv(world, "sig-refused", "tiny-student", ["tiny-teacher"], "--distill", "sig_kd=1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--teacher-logit-biases" in err[0], err
    assert main(_argv(world, "sig-given", "tiny-student", ["tiny-teacher"], "--distill", "sig_kd=1",
                      "--teacher-logit-biases=-10")) == 0


def test_siglip_teacher_from_a_teacher_cache(world):
    out = str(world["root"] / "cache")
    assert cache_teacher.main(["--teacher", "tiny-sigmoid", "--teacher-pretrained", world["tiny-sigmoid"],
                               "--train-data", world["csv"], "--data-root", world["data_root"], "--views", "2",
                               "--out", out, "--samples-per-shard", "8", "--batch-size", "8", "--workers", "0",
                               "--device", "cpu"]) == 0
    with open(f"{out}/manifest.json") as f:
        assert json.load(f)["teachers"][0]["logit_bias"] == pytest.approx(-10.0)
    assert main(_argv(world, "sig-cached", "tiny-student", [], "--teacher-cache", out,
                      "--distill", "task=1,sig_kd=1")) == 0


def test_open_clip_siglip_flag_trains_the_sigmoid_task_loss(world):
    """open_clip's --siglip: the run's task term is task_siglip (the loss-side scale and bias train)."""
    assert main(_argv(world, "siglip-flag", "tiny-student", [], "--siglip")) == 0
    ckpt = _final(world, "siglip-flag")
    assert ckpt["args"]["distill"] == "task_siglip=1"
    assert abs(ckpt["loss"]["siglip_logit_bias"].item() + 10.0) > 1e-4

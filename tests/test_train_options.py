"""Training flags through the real CLI: --lock-image / --lock-text, --save-frequency 0, mfd with text-only feat."""

import os

import pytest
import torch

import training  # noqa: F401
from helpers import write_image_csv
from training.main import main
from training.models import create_clip


@pytest.fixture(scope="module")
def world(module_tmp_path):
    root = module_tmp_path
    csv = write_image_csv(str(root / "data"), n=8, size=64)
    torch.manual_seed(3)
    init = create_clip("tiny-student", None, torch.device("cpu")).state_dict()
    torch.save(init, root / "student.pt")
    return {"root": root, "csv": csv, "data_root": str(root / "data"), "init": init}


def _train(world, name, *extra):
    """2 optimizer steps per epoch (8 samples, batch 4), task loss only: no teacher needed."""
    argv = ["--model", "tiny-student", "--pretrained", str(world["root"] / "student.pt"),
            "--train-data", world["csv"], "--data-root", world["data_root"], "--batch-size", "4",
            "--epochs", "1", "--lr", "1e-3", "--warmup", "1", "--precision", "fp32", "--workers", "0",
            "--logs", str(world["root"] / "logs"), "--name", name, "--zeroshot-frequency", "0",
            "--val-frequency", "0", "--device", "cpu", *extra]
    assert main(argv) == 0
    return os.path.join(world["root"], "logs", name, "checkpoints")


def _changed(world, ckpt_dir, filename):
    after = torch.load(os.path.join(ckpt_dir, filename), weights_only=True)["model"]
    assert after.keys() == world["init"].keys()
    return {k for k, v in after.items() if v.is_floating_point() and not torch.equal(v, world["init"][k])}


def _tower(names, prefix):
    return {n for n in names if n.startswith(prefix)}


def test_lock_image_trains_only_the_text_side(world):
    changed = _changed(world, _train(world, "lock_image", "--lock-image"), "epoch_1.pt")
    assert not _tower(changed, "visual.")
    assert {"token_embedding.weight", "text_projection", "transformer.resblocks.0.attn.in_proj_weight"} <= changed


def test_lock_image_unlocked_groups_leaves_the_last_group_trainable(world):
    changed = _changed(world, _train(world, "lock_image_2", "--lock-image", "--lock-image-unlocked-groups", "2"),
                       "epoch_1.pt")
    # open_clip's ViT groups: stem, blocks but the last, (last block + ln_post), proj
    assert {"visual.proj", "visual.ln_post.weight", "visual.transformer.resblocks.1.attn.in_proj_weight"} <= changed
    assert not _tower(changed, ("visual.conv1", "visual.transformer.resblocks.0.", "visual.positional_embedding"))


def test_lock_text_trains_only_the_image_side(world):
    changed = _changed(world, _train(world, "lock_text", "--lock-text"), "epoch_1.pt")
    assert not changed - _tower(changed, "visual.") - {"logit_scale"}
    assert {"visual.proj", "visual.conv1.weight", "visual.transformer.resblocks.0.attn.in_proj_weight"} <= changed


def test_save_frequency_0_saves_only_the_final_epoch(world):
    ckpt_dir = _train(world, "no_epoch_ckpts", "--save-frequency", "0", "--epochs", "3")
    assert sorted(f for f in os.listdir(ckpt_dir) if f.endswith(".pt")) == ["epoch_3.pt"]


def test_mfd_with_text_only_feat_trains(world):
    teacher = world["root"] / "teacher.pt"
    torch.save(create_clip("tiny-teacher", None, torch.device("cpu")).state_dict(), teacher)
    ckpt_dir = _train(world, "mfd_text_feat", "--teacher", "tiny-teacher", "--teacher-pretrained", str(teacher),
                      "--distill", "task=1,mfd=1,feat=1", "--feat-layers", "text:0:1,text:-1:-1", "--max-steps", "1")
    assert os.path.exists(os.path.join(ckpt_dir, "step_1.pt"))

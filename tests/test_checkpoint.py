"""The checkpoint manager: file names and cadence, `latest.txt`, --keep-last-k, and resume from a pruned folder."""

import os

import pytest
import torch

import training  # noqa: F401
from helpers import small_run_argv, small_world
from training.checkpoint import CheckpointManager
from training.config import CheckpointConfig
from training.main import main


@pytest.fixture(scope="module")
def world(module_tmp_path):
    return small_world(module_tmp_path)


_argv = small_run_argv


def _files(world, name):
    folder = world["root"] / "logs" / name / "checkpoints"
    return folder, sorted(n for n in os.listdir(folder) if n.endswith(".pt"))


@pytest.mark.parametrize("epoch, step, epoch_done, finished, preempted, expected", [
    (0, 2, False, False, False, "step_2.pt"),  # every 2 steps mid-epoch
    (0, 3, False, False, False, None),
    (0, 3, False, True, False, "step_3.pt"),  # --max-steps mid-epoch
    (1, 3, True, False, False, None),  # epoch 1 of 4 with --save-frequency 2
    (2, 6, True, False, False, "epoch_2.pt"),
    (3, 9, True, True, False, "epoch_3.pt"),  # --max-steps at an epoch end: the epoch file
    (3, 9, True, False, True, "step_9.pt"),  # a stop request: always the step file the requeue resumes
    (4, 12, True, False, False, "epoch_4.pt"),  # the last epoch is always saved
])
def test_the_manager_decides_which_file_a_step_writes(epoch, step, epoch_done, finished, preempted, expected):
    manager = CheckpointManager(CheckpointConfig(save_frequency=2, save_every_n_steps=2), None, None, engine=None,
                                loss=None, scaler=None, train=None, data=None, record={}, num_batches=3, epochs=4)
    assert manager.due(step=step, epoch=epoch, epoch_done=epoch_done, finished=finished,
                       preempted=preempted) == expected


def test_keep_last_k_prunes_old_files_and_resume_latest_continues(world):
    assert main(_argv(world, "keep2", "--save-every-n-steps", "1", "--keep-last-k", "2", "--max-steps", "4")) == 0
    folder, names = _files(world, "keep2")
    # steps 1, 2, epoch 1 (step 3), step 4: the two newest stay and latest.txt names the newest
    assert names == ["epoch_1.pt", "step_4.pt"], names
    assert (folder / "latest.txt").read_text().strip() == "step_4.pt"
    assert main(_argv(world, "keep2", "--save-every-n-steps", "1", "--keep-last-k", "2", "--resume", "latest")) == 0
    _, names = _files(world, "keep2")
    assert names == ["epoch_2.pt", "step_5.pt"], names
    final = torch.load(folder / "epoch_2.pt", weights_only=True)
    assert (final["step"], final["epoch"], final["batch_in_epoch"]) == (6, 2, 0)
    # the same run without pruning or interruption ends in the same weights
    assert main(_argv(world, "whole")) == 0
    whole = torch.load(world["root"] / "logs" / "whole" / "checkpoints" / "epoch_2.pt", weights_only=True)
    assert all(torch.equal(whole["model"][k], final["model"][k]) for k in whole["model"])


def test_without_keep_last_k_every_checkpoint_stays(world):
    assert main(_argv(world, "keepall", "--save-every-n-steps", "2", "--epochs", "1")) == 0
    assert _files(world, "keepall")[1] == ["epoch_1.pt", "step_2.pt"]


def test_checkpoint_records_the_config_and_epoch_length(world):
    assert main(_argv(world, "record", "--epochs", "1")) == 0
    state = torch.load(world["root"] / "logs" / "record" / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert state["num_batches"] == 3 and state["world_size"] == 1 and len(state["rng"]) == 1
    assert state["args"]["model"] == "tiny-student" and state["args"]["batch_size"] == 4
    assert not any(k.startswith("_") for k in state["args"])  # the flat config record, nothing derived

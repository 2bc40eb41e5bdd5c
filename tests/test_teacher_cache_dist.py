"""Teacher cache under torchrun: 2 ranks build the same cache as 1 (shards split by rank, byte-identical), and
training from the cache on 2 ranks matches 1 process at the same global batch."""

import json
import os
import re
import subprocess
import sys

import torch

import training  # noqa: F401
from helpers import free_port
from test_teacher_cache import build_argv, train_argv, write_images
from training import cache_teacher
from training.main import main
from training.models import create_clip


def _torchrun(nproc, module, argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", module, *argv]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_ranks_build_the_same_cache_and_train_like_one(tmp_path):
    csv = write_images(str(tmp_path / "data"))
    teacher = str(tmp_path / "teacher.pt")
    torch.manual_seed(7)
    torch.save(create_clip("tiny-teacher", None, torch.device("cpu")).state_dict(), teacher)
    world = {"root": tmp_path, "csv": csv, "data_root": str(tmp_path / "data"), "teacher": teacher}

    one, two = tmp_path / "one", tmp_path / "two"
    assert cache_teacher.main(build_argv(world, one)) == 0
    result = _torchrun(2, "training.cache_teacher", build_argv(world, two))
    assert result.stdout.count("OK ") == 1  # rank 0 verifies and prints the summary line
    m1, m2 = (json.load(open(d / "manifest.json")) for d in (one, two))
    assert m2["built"]["world_size"] == 2
    assert [(r["name"], r["sha256"]) for r in m1["shards"]] == [(r["name"], r["sha256"]) for r in m2["shards"]]

    cache = ["--teacher-cache", str(two), "--max-steps", "4", "--gather-with-grad"]
    assert main(train_argv(world, "one", *cache, batch_size=4)) == 0
    _torchrun(2, "training.main", train_argv(world, "two", *cache, batch_size=2))
    # the global loss of every step agrees (the cached targets were joined to the right samples on both ranks)
    losses = [re.findall(r"train step (\d+) \| .*? total: (\S+)", open(tmp_path / "logs" / n / "out.log").read())
              for n in ("one", "two")]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    # and the weights agree up to Adam's amplification of float noise in near-zero gradients (attention key
    # biases get none in exact arithmetic: their update is noise / (|noise| + eps) * lr, whichever the process count)
    a, b = (torch.load(tmp_path / "logs" / n / "checkpoints" / "step_4.pt", weights_only=True) for n in ("one", "two"))
    for part in ("model", "loss"):
        for k in a[part]:
            assert torch.allclose(a[part][k], b[part][k], atol=5e-4, rtol=1e-3), (part, k)

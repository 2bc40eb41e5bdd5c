"""--horovod with the real Horovod (not tests/fake_horovod): 2 processes under horovodrun's Gloo launcher.

Needs .venv-horovod (bash scripts/build_horovod.sh: CPU torch 2.13.0 and Horovod 0.28.1 compiled from source); skipped
without it. The runs go through the real CLI in that venv, in subprocesses; this process only compares checkpoints.
"""

import math
import os
import re
import subprocess

import pytest
import torch

import training  # noqa: F401
from helpers import free_port, kd_world, optimizer_tensors, relative_distance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv-horovod")
HVD_PYTHON = os.path.join(VENV, "bin", "python")
HOROVODRUN = os.path.join(VENV, "bin", "horovodrun")

pytestmark = pytest.mark.slow


def _horovod_problem() -> str | None:
    if not os.path.isfile(HVD_PYTHON) or not os.path.isfile(HOROVODRUN):
        return f"{VENV} is missing: build it with `bash scripts/build_horovod.sh`"
    probe = subprocess.run([HVD_PYTHON, "-c", "import horovod.torch as hvd; assert hvd.gloo_built()"],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return f"{HVD_PYTHON} has no working horovod.torch with Gloo ({last}): run `bash scripts/build_horovod.sh`"
    return None


@pytest.fixture(scope="module")
def world(module_tmp_path):
    problem = _horovod_problem()
    if problem:
        pytest.skip(problem)
    return kd_world(module_tmp_path)


def _argv(world, name, *extra, batch_size):
    # 24 images: 3 steps per epoch at a global batch of 8, so 4 steps cross an epoch boundary
    return ["-m", "training.main", "--model", "tiny-student", "--teacher", "tiny-teacher",
            "--teacher-pretrained", world["teacher"], "--train-data", world["csv"], "--data-root", world["data_root"],
            "--batch-size", str(batch_size), "--epochs", "2", "--lr", "1e-3", "--warmup", "2", "--precision", "fp32",
            "--workers", "0", "--logs", str(world["root"] / "logs"), "--name", name, "--log-every-n-steps", "1",
            "--zeroshot-frequency", "0", "--val-frequency", "0", "--device", "cpu", "--recipe", "clip-kd",
            "--gather-with-grad", *extra]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "VIRTUAL_ENV")}
    # MASTER_*: the distillation loss all-gathers features through torch.distributed beside Horovod (see launch)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.path.join(ROOT, "src"),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return env


def _run(cmd, timeout=600, env=None):
    result = subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return result


def plain(world, name, *extra, batch_size=8):
    return _run([HVD_PYTHON, *_argv(world, name, *extra, batch_size=batch_size)])


def _horovodrun(world, name, *extra, batch_size):
    return [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", "--start-timeout", "300", HVD_PYTHON,
            *_argv(world, name, "--horovod", *extra, batch_size=batch_size)]


def horovod(world, name, *extra, batch_size=4):
    return _run(_horovodrun(world, name, *extra, batch_size=batch_size))


def _ckpt(world, name, filename):
    return torch.load(world["root"] / "logs" / name / "checkpoints" / filename, weights_only=True)


_relative, _optimizer_tensors = relative_distance, optimizer_tensors


def _logged_steps(world, name) -> list[dict[str, str]]:
    """The `train step N | k: v ...` lines of rank 0's out.log, as {key: value text}."""
    with open(world["root"] / "logs" / name / "out.log") as f:
        lines = [line.split("|", 1)[1] for line in f if re.search(r"train step \d+ \|", line)]
    return [dict(re.findall(r"([\w/]+): (\S+)", line)) for line in lines]


@pytest.fixture(scope="module")
def trained(world):
    """name -> step_4.pt of a 4-step run, each run once: plain ones in one process at batch 8, Horovod ones in 2."""
    done = {}

    def get(name, *extra, hvd, batch_size=None):
        if name not in done:
            if hvd:
                horovod(world, name, "--max-steps", "4", *extra, batch_size=batch_size or 4)
            else:
                plain(world, name, "--max-steps", "4", *extra, batch_size=batch_size or 8)
            done[name] = _ckpt(world, name, "step_4.pt")
        return done[name]

    return get


TOL = 1e-4  # measured: ~1e-5 of float noise (Adam amplifies it on exactly-zero gradients, test_train_e2e.py)
CLIP = ("--grad-clip-norm", "0.5")  # clipping runs synchronize() then step() under skip_synchronize()


VARIANTS = {  # name: (the plain run's extra flags, the Horovod run's, Horovod's per-rank batch)
    "synced": ((), (), 4),
    "clipped": (CLIP, CLIP, 4),
    "accumulated": ((), ("--accum-freq", "2"), 2),  # backward_passes_per_step=2: 2 ranks x 2 x 2 = 8
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_horovod_processes_match_one_plain_process_at_the_same_global_batch(trained, variant):
    plain_extra, hvd_extra, hvd_batch = VARIANTS[variant]
    one = trained("plain" + "-clip" * bool(plain_extra), *plain_extra, hvd=False)
    two = trained(f"hvd-{variant}", *hvd_extra, hvd=True, batch_size=hvd_batch)
    assert one["step"] == two["step"] == 4
    for part in ("model", "loss"):
        assert _relative(one[part], two[part]) < TOL, part
    assert _relative(_optimizer_tensors(one["optimizer"]), _optimizer_tensors(two["optimizer"])) < TOL


def test_the_tolerance_tells_runs_apart(world, trained):
    one = trained("plain", hvd=False)
    # one optimizer step (step 3 -> 4), or clipping, moves the weights by far more than TOL
    assert _relative(one["model"], _ckpt(world, "plain", "epoch_1.pt")["model"]) > 10 * TOL
    assert _relative(one["model"], trained("plain-clip", *CLIP, hvd=False)["model"]) > 10 * TOL


def test_horovod_checkpoint_resumes_where_it_stopped(world, trained):
    straight = trained("hvd-synced", hvd=True)
    horovod(world, "hvd-resumed", "--max-steps", "2")
    stopped = _ckpt(world, "hvd-resumed", "step_2.pt")
    assert (stopped["step"], stopped["epoch"], stopped["batch_in_epoch"]) == (2, 0, 2)
    horovod(world, "hvd-resumed", "--max-steps", "4", "--resume", "latest")
    with open(world["root"] / "logs" / "hvd-resumed" / "out.log") as f:
        assert re.search(r"resumed from \S+step_2\.pt at epoch 0, step 2", f.read())
    resumed = _ckpt(world, "hvd-resumed", "step_4.pt")
    assert resumed["step"] == 4
    # exactly the straight run's steps 3 and 4 (with 2 ranks Horovod's sums are order-free, so bit for bit)
    for part in ("model", "loss"):
        assert all(torch.equal(straight[part][k], resumed[part][k]) for k in straight[part]), part
    a, b = _optimizer_tensors(straight["optimizer"]), _optimizer_tensors(resumed["optimizer"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_horovod_amp_bf16_trains_with_finite_losses(world):
    horovod(world, "hvd-bf16", "--precision", "amp_bf16", "--max-steps", "2")
    steps = _logged_steps(world, "hvd-bf16")
    assert len(steps) == 2, steps
    for step in steps:
        assert math.isfinite(float(step["total"])), step
        assert float(step["nonfinite_skipped_steps"]) == 0, step
    model = _ckpt(world, "hvd-bf16", "step_2.pt")["model"]
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())


def test_horovod_without_master_addr_is_a_usage_error_on_every_rank(world):
    env = {k: v for k, v in _env().items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run(_horovodrun(world, "hvd-no-master", "--max-steps", "1", batch_size=4), env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    for rank in (0, 1):  # horovodrun prefixes each worker's lines with its rank
        assert f"[{rank}]<stderr>:error: --horovod: export MASTER_ADDR and MASTER_PORT too" in out, out[-2000:]
    assert "exit with status code 2" in out

"""The defects found where users run (issue: every engine x precision path exercised). Each test failed on the code
before the fix. The engine x precision matrix itself is tests/test_matrix.py (fp16 loss scaling under FSDP2, bf16
under DDP and Horovod, ...)."""

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import training  # noqa: F401
from helpers import free_port, kd_world
from test_train_e2e import _grads_worker
from training import distributed
from training.checkpoint import restore_rank_rng
from training.main import main
from training.models import create_clip
from training.models.towers import mask_keys, mask_tokens
from training.params import parse_config
from training.tokenizers import same_tokenizer
from training.trainer import Trainer


@pytest.fixture(scope="module")
def world(module_tmp_path):
    return kd_world(module_tmp_path)


def argv(world, name="", *extra, batch_size=8, model="tiny-student", epochs=2):
    return ["--model", model, "--teacher", "tiny-teacher", "--teacher-pretrained", world["teacher"],
            "--train-data", world["csv"], "--data-root", world["data_root"], "--batch-size", str(batch_size),
            "--epochs", str(epochs), "--lr", "1e-3", "--warmup", "2", "--precision", "fp32", "--workers", "0",
            "--logs", str(world["root"] / "logs") if name else "", "--name", name or "x", "--log-every-n-steps", "1",
            "--zeroshot-frequency", "0", "--val-frequency", "0", "--device", "cpu", "--recipe", "clip-kd", *extra]


def _build(args_list):
    return Trainer(parse_config(args_list), distributed.init_distributed("cpu"))


# ---- bf16 under DDP: the student itself is open_clip's bf16 model ------------------------------------------------

def test_bf16_without_a_sharding_engine_trains_open_clips_bf16_student(world):
    trainer = _build(argv(world, "", "--precision", "bf16"))
    visual = trainer.student.visual
    assert visual.conv1.weight.dtype == torch.bfloat16  # the batch is bf16: so are the weights that read it
    assert trainer.student.logit_scale.dtype == torch.float32  # open_clip keeps the scale and norms in fp32
    trainer.data.set_epoch(0)
    from training.train import train_step

    losses = train_step(trainer, next(iter(trainer.data.dataloader)))
    assert losses is not None and torch.isfinite(losses["total"])


# ---- the teacher's tokenizer: decided by what the tokenizers produce ------------------------------------------------

class _Vocab:
    """Same class, same context length, different vocabulary (SigLIP's T5 vs SigLIP 2's Gemma in miniature)."""

    def __init__(self, offset, context_length=16):
        self.offset, self.context_length = offset, context_length

    def __call__(self, texts):
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [(ord(c) + self.offset) % 1000 for c in t][: self.context_length]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def test_the_teacher_gets_its_own_tokenizer_when_the_vocabularies_differ():
    from training.models import ModelBundle
    from training.trainer import build_transforms

    a, b, a_again = _Vocab(0), _Vocab(7), _Vocab(0)
    assert not same_tokenizer(a, b)
    assert same_tokenizer(a, a_again) and same_tokenizer(a, a)

    model = create_clip("tiny-student", None, torch.device("cpu"))
    from training.data.transforms import ImageFormat

    fmt = ImageFormat.from_model(model)
    student, teacher = ModelBundle(model, fmt, a, 16), ModelBundle(model, fmt, b, 16)
    assert build_transforms(student, teacher, seed=0).teacher_tokenizer is b
    assert build_transforms(student, ModelBundle(model, fmt, a_again, 16), seed=0).teacher_tokenizer is None


# ---- each rank's own random state, restored on its own rank -----------------------------------------------------

def _rng_worker(rank, world_size, port, args_list, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env = distributed.init_distributed("cpu")
    trainer = Trainer(parse_config(args_list), env)
    torch.rand(rank + 1)  # advance each rank's generator differently
    state = trainer.state_dict()
    expected = torch.get_rng_state()
    torch.rand(10)
    restored = restore_rank_rng(state["rng"], env.rank, env.world_size, env.device)
    wrong_world = restore_rank_rng(state["rng"], 0, 3, env.device)
    torch.save({"n": len(state["rng"]), "restored": restored, "same": torch.equal(torch.get_rng_state(), expected),
                "wrong_world": wrong_world, "state": expected}, f"{out}.{rank}")
    distributed.cleanup()


def test_each_rank_saves_and_restores_its_own_random_state(world, tmp_path):
    out = str(tmp_path / "rng")
    mp.spawn(_rng_worker, args=(2, free_port(), argv(world, batch_size=4), out), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1))
    assert r0["n"] == r1["n"] == 2
    assert r0["restored"] and r1["restored"] and r0["same"] and r1["same"]
    assert not torch.equal(r0["state"], r1["state"])  # per-rank streams (seed + rank), not copies of rank 0's
    assert not r0["wrong_world"] and not r1["wrong_world"]  # another world size: refused, no IndexError


# ---- mfd masks: one per sample of the global batch, whatever the process count --------------------------------

def test_mask_keys_depend_on_the_global_position_only():
    positions = torch.arange(8)
    one = mask_keys(0, 5, positions)
    two = torch.cat([mask_keys(0, 5, positions[:4]), mask_keys(0, 5, positions[4:])])
    assert torch.equal(one, two)
    tokens = torch.arange(1 + 64, dtype=torch.float32).reshape(1, 65, 1).expand(8, 65, 1)
    kept = mask_tokens(tokens, 0.5, keys=one)[:, 1:, 0]
    assert kept.shape == (8, 32)
    assert len({tuple(row.tolist()) for row in kept}) == 8  # 8 distinct masks in the global batch
    assert not torch.equal(kept, mask_tokens(tokens, 0.5, keys=mask_keys(0, 6, positions))[:, 1:, 0])  # next step
    assert torch.equal(kept, mask_tokens(tokens, 0.5, keys=one)[:, 1:, 0])  # a pure function of the key


def test_mfd_gradients_of_two_processes_equal_one(world, tmp_path):
    """Before: every rank drew the same masks for its i-th sample, so 2 x 4 samples saw other masks than 1 x 8."""
    results = {}
    for nproc, batch_size in ((1, 8), (2, 4)):
        args_list = argv(world, "", "--distill", "task=1,mfd=2000", "--gather-with-grad", batch_size=batch_size)
        out = str(tmp_path / f"grads{nproc}.pt")
        mp.spawn(_grads_worker, args=(nproc, free_port(), args_list, out), nprocs=nproc, join=True)
        results[nproc] = torch.load(f"{out}.0", weights_only=True)
    one, two = results[1], results[2]
    assert abs(float(one["losses"]["mfd"]) - float(sum(torch.load(str(tmp_path / f"grads2.pt.{r}"),
                                                                  weights_only=True)["losses"]["mfd"]
                                                       for r in (0, 1)) / 2)) < 1e-5
    for k, a in one["grads"].items():
        b = two["grads"][k]
        assert float((a - b).norm()) <= 1e-4 * float(a.norm()) + 1e-7, k


# ---- BatchNorm under GradCache accumulation ------------------------------------------------------------------

def test_accumulation_updates_batchnorm_statistics_once_per_micro_batch(world):
    trainer = _build(argv(world, "", "--accum-freq", "2", batch_size=4, model="tiny-student-rn"))
    norms = [m for m in trainer.student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    reference = create_clip("tiny-student-rn", None, torch.device("cpu"))
    reference.load_state_dict(trainer.student.state_dict())
    trainer.data.set_epoch(0)
    micro = next(iter(trainer.data.dataloader))
    reference.train()
    from training.data.device import model_image

    with torch.no_grad():
        for b in micro:  # what two plain forwards of the micro-batches do to the statistics (uint8 batches)
            reference.encode_image(model_image(b["image"], trainer.student_bundle.image_format, torch.device("cpu"),
                                               torch.float32))
    from training.train import accumulated_step

    trainer.model.train()
    assert accumulated_step(trainer, micro) is not None
    ref_norms = [m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m, r in zip(norms, ref_norms):
        assert int(m.num_batches_tracked) == 2
        assert torch.allclose(m.running_mean, r.running_mean, atol=1e-6)
        assert torch.allclose(m.running_var, r.running_var, atol=1e-6)


# ---- learnable icl/afd scales: the parameter is clamped, so the gradient survives a bound ------------------------

def test_learned_scales_keep_their_gradient_past_a_bound(world):
    trainer = _build(argv(world, "", "--distill", "task=1,icl=1,afd=1"))
    loss_fn = trainer.loss_fn
    with torch.no_grad():
        loss_fn.icl_logit_scale.fill_(math.log(100.0) + 0.5)  # crossed the upper bound
        loss_fn.afd_logit_scale.fill_(-0.5)  # and the lower one
    for name, param in (("icl", loss_fn.icl_logit_scale), ("afd", loss_fn.afd_logit_scale)):
        value = loss_fn.learned_scale(name)
        (grad,) = torch.autograd.grad(value, param)
        assert grad.item() != 0.0, name  # exp(p).clamp(1, 100) had zero gradient here: stuck for good
    loss_fn.clamp_scales_()
    assert loss_fn.icl_logit_scale.item() == pytest.approx(math.log(100.0))
    assert loss_fn.afd_logit_scale.item() == 0.0


# ---- resume refuses what breaks exact resume --------------------------------------------------------------------

def test_resume_with_another_global_batch_is_refused_in_one_line(world, capsys):
    assert main(argv(world, "gb", "--max-steps", "2", batch_size=8)) == 0
    assert main(argv(world, "gb", "--resume", "latest", batch_size=4)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "global batch is 8" in err[0] and "is 4" in err[0], err
    assert main(argv(world, "gb", "--resume", "latest", "--seed", "3", batch_size=8)) == 2
    assert "--seed" in capsys.readouterr().err
    assert main(argv(world, "gb", "--resume", "latest", "--lock-image", batch_size=8)) == 2  # other optimizer groups
    assert "--lock-image" in capsys.readouterr().err


def test_an_unwritable_run_folder_is_one_line(world, capsys):
    args_list = argv(world, "x", batch_size=8)
    args_list[args_list.index("--logs") + 1] = "/proc/no-such-place"
    assert main(args_list) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write the run folder" in err[0]


def test_resume_at_the_same_global_batch_says_what_changed(world):
    assert main(argv(world, "noted", "--max-steps", "2", batch_size=4)) == 0
    assert main(argv(world, "noted", "--resume", "latest", "--accum-freq", "2", "--lr", "2e-3", batch_size=2)) == 0
    text = (world["root"] / "logs" / "noted" / "out.log").read_text()
    assert "--accum-freq 2 instead of 1" in text and "--lr changed" in text


# ---- preemption: a real signal to a real run -------------------------------------------------------------------

def _start(world, name, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "training.main", *argv(world, name, "--epochs", "4", *extra, batch_size=4)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_step(world, name, step, proc, timeout=300):
    log = world["root"] / "logs" / name / "out.log"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and f"train step {step} " in log.read_text():
            return
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout} s")


def _final(world, name):
    return torch.load(world["root"] / "logs" / name / "checkpoints" / "epoch_4.pt", weights_only=True)


@pytest.mark.parametrize("how", ["SIGUSR1", pytest.param("SIGTERM", marks=pytest.mark.slow), "stop-file"])
def test_a_stop_request_checkpoints_the_step_and_resume_continues_exactly(world, how):
    """SLURM's USR1 (or the scheduler's TERM, or the sbatch trap's stop file): finish the step, save, exit 0."""
    if not os.path.exists(world["root"] / "logs" / "straight" / "checkpoints" / "epoch_4.pt"):
        assert main(argv(world, "straight", "--epochs", "4", batch_size=4)) == 0  # 6 steps/epoch, 24 in all
    name = f"stopped-{how}"
    proc = _start(world, name)
    _wait_for_step(world, name, 3, proc)
    if how == "stop-file":
        (world["root"] / "logs" / name / "stop").touch()
    else:
        proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    ckpt_dir = world["root"] / "logs" / name / "checkpoints"
    latest = (ckpt_dir / "latest.txt").read_text().strip()
    stopped_at = torch.load(ckpt_dir / latest, weights_only=True)["step"]
    assert latest == f"step_{stopped_at}.pt" and 3 <= stopped_at < 24
    assert "continue with --resume latest" in (world["root"] / "logs" / name / "out.log").read_text()
    assert main(argv(world, name, "--epochs", "4", "--resume", "latest", batch_size=4)) == 0
    assert not (world["root"] / "logs" / name / "stop").exists()  # the next run does not stop at once
    a, b = _final(world, "straight"), _final(world, name)
    assert a["step"] == b["step"] == 24
    for part in ("model", "loss"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)


# ---- locked towers under DeepSpeed: the frozen parameters have no optimizer state ---------------------------------

@pytest.mark.skipif(not __import__("importlib").util.find_spec("deepspeed"), reason="deepspeed is not installed")
def test_a_locked_tower_under_deepspeed_saves_and_resumes(world):
    config = world["root"] / "zero2.json"
    config.write_text('{"zero_optimization": {"stage": 2}}')
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    base = [sys.executable, "-m", "training.main",
            *argv(world, "ds-lock", "--deepspeed", str(config), "--lock-image", batch_size=4)]
    for extra in (["--max-steps", "2"], ["--max-steps", "3", "--resume", "latest"]):
        result = subprocess.run(base + extra, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
    ckpt = world["root"] / "logs" / "ds-lock" / "checkpoints"
    before = torch.load(ckpt / "step_2.pt", weights_only=True)
    after = torch.load(ckpt / "step_3.pt", weights_only=True)
    assert after["step"] == 3
    visual = [k for k in before["model"] if k.startswith("visual.")]
    assert visual and all(torch.equal(before["model"][k], after["model"][k]) for k in visual)  # locked: unchanged
    assert any(not torch.equal(before["model"][k], after["model"][k]) for k in before["model"] if k.startswith("transformer."))

"""Every engine x precision x teacher x accumulation path: two optimizer steps with finite losses, a checkpoint, and a
resume that continues exactly. Unsupported combinations are refused at start-up with one line.

The CUDA fp16 path (fp16 autocast + a real GradScaler) is emulated on CPU with --amp-fp16-on-cpu, so the failures of
that path (FSDP2's DTensor gradients mixed with plain ones in the unscale) are caught here. Horovod runs through the
stand-in (tests/fake_horovod); the real build is tests/test_horovod_real.py.

The default suite runs the core rows (each engine under fp16 loss scaling and under bf16, and cached / accumulated
rows); `-m slow` runs the whole matrix.
"""

import importlib.util
import itertools
import json
import os
import shutil

import pytest
import torch
import torch.multiprocessing as mp

import training  # noqa: F401
from helpers import free_port, kd_world
from training import cache_teacher

FAKE_HOROVOD = os.path.join(os.path.dirname(__file__), "fake_horovod")
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None

ENGINES = ("single", "ddp", "fsdp", "zero2", "zero3", "horovod")
PRECISIONS = ("fp32", "amp", "amp_bf16", "bf16")
TEACHERS = ("online", "cached")
ACCUM = (1, 2)
# What the README's scale-out table promises: fp16 loss scaling is not wired through DeepSpeed's or Horovod's
# optimizer, so --precision amp (fp16 + GradScaler on CUDA) is refused there; everything else runs.
REFUSED = {("zero2", "amp"), ("zero3", "amp"), ("horovod", "amp")}
CORE = [(e, p, "online", 1) for e in ENGINES for p in ("amp", "bf16")] + [
    ("ddp", "amp_bf16", "cached", 2), ("fsdp", "amp", "cached", 2), ("zero2", "bf16", "cached", 2),
    ("single", "fp32", "cached", 2), ("horovod", "amp_bf16", "cached", 1), ("zero3", "fp32", "online", 2)]
ALL = list(itertools.product(ENGINES, PRECISIONS, TEACHERS, ACCUM))
RECORD_PARTS = ("step", "model", "loss", "scaler")  # what check_combo reads of each state


def combo_name(combo) -> str:
    return "-".join(map(str, combo))


@pytest.fixture(scope="module")
def world(module_tmp_path):
    w = kd_world(module_tmp_path, n=16)
    root, csv, teacher = w["root"], w["csv"], w["teacher"]
    for stage in (2, 3):
        with open(root / f"zero{stage}.json", "w") as f:
            json.dump({"zero_optimization": {"stage": stage}}, f)
    cache = str(root / "cache")
    assert cache_teacher.main(["--teacher", "tiny-teacher", "--teacher-pretrained", teacher, "--train-data", csv,
                               "--data-root", str(root / "data"), "--views", "2", "--out", cache,
                               "--batch-size", "4", "--workers", "0", "--device", "cpu"]) == 0
    return {**w, "cache": cache}


def combo_argv(world, engine, precision, teacher, accum, device="cpu") -> list[str]:
    flags = {"single": [], "ddp": [], "fsdp": ["--fsdp"], "horovod": ["--horovod"],
             "zero2": ["--deepspeed", str(world["root"] / "zero2.json")],
             "zero3": ["--deepspeed", str(world["root"] / "zero3.json")]}[engine]
    teacher_flags = (["--teacher", "tiny-teacher", "--teacher-pretrained", world["teacher"]] if teacher == "online"
                     else ["--teacher-cache", world["cache"]])
    per_rank = 4 if engine == "single" else 2  # global batch 4 per micro-batch either way
    return ["--model", "tiny-student", *teacher_flags, "--train-data", world["csv"], "--data-root", world["data_root"],
            "--batch-size", str(per_rank // accum), "--accum-freq", str(accum), "--epochs", "1", "--lr", "1e-3",
            "--warmup", "1", "--precision", precision, "--amp-fp16-on-cpu", "--workers", "0", "--logs", "",
            "--log-every-n-steps", "1", "--zeroshot-frequency", "0", "--val-frequency", "0", "--device", device,
            "--recipe", "clip-kd", "--gather-with-grad", *flags]


def run_matrix(world, combos, out_dir, device="cpu", extra=()):
    """Straight 2-step jobs (checkpoint after step 1), then jobs that resume each from its step-1 checkpoint, one
    engine at a time (its files are removed once read: the whole matrix at once would write gigabytes). On CPU the
    engines other than `single` run as 2 gloo processes; on CUDA (one GPU) every engine runs as one process, NCCL."""
    from parallel_jobs import run_jobs

    records = {}
    for engine in ENGINES:
        mine = [c for c in combos if c[0] == engine and (HAS_DEEPSPEED or not engine.startswith("zero"))]
        if not mine:
            continue
        nprocs = 1 if device == "cuda" or engine == "single" else 2
        engine_dir = os.path.join(out_dir, engine)
        os.makedirs(engine_dir)
        jobs = [dict(argv=combo_argv(world, *combo, device=device) + list(extra), mid=1, steps=2,
                     sys_path=FAKE_HOROVOD if engine == "horovod" else None, record_parts=RECORD_PARTS,
                     record_grads=False, name=combo_name(combo)) for combo in mine]
        mp.spawn(run_jobs, args=(nprocs, free_port(), jobs, engine_dir, device), nprocs=nprocs, join=True)
        for combo, job in zip(mine, jobs):
            records[combo] = {"straight": _load(engine_dir, job["name"])}
        resumes = [dict(job, name=f"{job['name']}.resumed", resume=os.path.join(engine_dir, f"{job['name']}.mid.ckpt"))
                   for combo, job in zip(mine, jobs) if "refused" not in records[combo]["straight"]]  # what ran
        if resumes:
            mp.spawn(run_jobs, args=(nprocs, free_port(), resumes, engine_dir, device), nprocs=nprocs, join=True)
        for combo in mine:
            name = f"{combo_name(combo)}.resumed"
            if os.path.exists(os.path.join(engine_dir, f"{name}.pt")):
                records[combo]["resumed"] = _load(engine_dir, name)
        shutil.rmtree(engine_dir)  # what the checks read is in `records` now
    return records


def _load(out_dir, name):
    return torch.load(os.path.join(out_dir, f"{name}.pt"), weights_only=False)


def check_combo(records, combo):
    if combo[0].startswith("zero") and not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed")
    straight = records[combo]["straight"]
    if (combo[0], combo[1]) in REFUSED:
        message = straight.get("refused", "")
        assert message and "\n" not in message and "--precision" in message, straight.keys()
        return
    assert "refused" not in straight, straight.get("refused")
    losses = straight["losses"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(v)).all() for step in losses for v in step.values())
    final, mid = straight["final"], straight["mid"]
    assert (mid["step"], final["step"]) == (1, 2)
    updated = any(not torch.equal(mid["model"][k], final["model"][k]) for k in final["model"])
    if combo[1] == "amp":  # the fp16 path really ran with loss scaling; an overflowing step is skipped, scale halved
        assert final["scaler"] is not None
        assert updated or final["scaler"]["scale"] < mid["scaler"]["scale"]
    else:
        assert updated  # step 2 changed the weights
    resumed = records[combo]["resumed"]
    assert resumed["final"]["step"] == 2
    for part in ("model", "loss"):
        for k, v in final[part].items():
            assert torch.equal(v, resumed["final"][part][k]), (part, k, (v.float() - resumed["final"][part][k].float()).abs().max())


@pytest.fixture(scope="module")
def core_records(world):
    return run_matrix(world, CORE, str(world["root"] / "core"))


@pytest.mark.parametrize("combo", CORE, ids=combo_name)
def test_core_combination_trains_saves_and_resumes(core_records, combo):
    check_combo(core_records, combo)


@pytest.fixture(scope="module")
def all_records(world):
    return run_matrix(world, [c for c in ALL if c not in CORE], str(world["root"] / "all"))


@pytest.mark.slow
@pytest.mark.parametrize("combo", [c for c in ALL if c not in CORE], ids=combo_name)
def test_every_combination_trains_saves_and_resumes(all_records, combo):
    check_combo(all_records, combo)


# ---- one GPU (scripts/gpu_check.sh): the real CUDA fp16 path, NCCL, torch.compile on and off ---------------------

CUDA_ENGINES = ("single", "fsdp", "zero2", "zero3")
CUDA_ALL = [c for c in itertools.product(CUDA_ENGINES, PRECISIONS, TEACHERS, ACCUM)]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")


@pytest.fixture(scope="module")
def cuda_records(world):
    return run_matrix(world, CUDA_ALL, str(world["root"] / "cuda"), device="cuda")


@pytest.fixture(scope="module")
def cuda_compiled_records(world):
    combos = [("single", "bf16", "online", 1), ("single", "amp", "cached", 1), ("fsdp", "amp_bf16", "online", 2)]
    return run_matrix(world, combos, str(world["root"] / "cuda-compiled"), device="cuda", extra=("--torchcompile",))


@needs_cuda
@pytest.mark.parametrize("combo", CUDA_ALL, ids=combo_name)
def test_every_single_gpu_combination(cuda_records, combo):
    if combo[0] == "horovod":
        pytest.skip("horovod: tests/test_horovod_real.py")
    check_combo(cuda_records, combo)


@needs_cuda
@pytest.mark.parametrize("combo", [("single", "bf16", "online", 1), ("single", "amp", "cached", 1),
                                   ("fsdp", "amp_bf16", "online", 2)], ids=combo_name)
def test_torchcompile_on_one_gpu(cuda_compiled_records, combo):
    check_combo(cuda_compiled_records, combo)

"""Step-time benchmark: what does distillation cost on top of running the two models?

    python benchmarks/step_time.py                       # tiny configs, CPU
    python benchmarks/step_time.py --student ViT-T-16 --teacher ViT-B-16 --image-size 224 --device cuda \
        --precision amp_bf16 --batch-size 128

Measures, in one run and interleaved (so machine noise hits all of them alike), the median of:
  student step  = a full optimizer step of the student with the task loss only (no teacher)
  teacher fwd   = the frozen teacher's forward on the same batch
  KD step       = a full optimizer step with the teacher and the KD recipe
and reports overhead = KD step / (student step + teacher fwd) - 1 (target <= 10%).

With --cache (training from a teacher-embedding cache, docs/teacher_cache.md) it also builds a small cache of the
benchmark batch with `python -m training.cache_teacher` and times
  cached KD step = a full optimizer step with the KD recipe whose teacher embeddings come from the cache
reporting cached KD / student step (target <= 1.05) and the speed-up over the online KD step, plus the cache's
bytes per sample for every storage format.

Model FLOPs utilisation (MFU) is printed with the count it uses, measured by torch's FlopCounterMode on the batch:
a step is 3 x the student's forward (forward + backward) plus, online, 1 x the teacher's forward; MFU = that count
x steps/s / the device's peak (--peak-tflops; by default the dense bf16 peak of known GPUs, e.g. 989 for H100/H200). --pairs times several teacher:student pairs in one run:

    python benchmarks/step_time.py --cache --pairs tiny-teacher:tiny-student,ViT-B-32:ViT-T-16 --batch-size 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from training import distributed  # noqa: E402
from training.data.device import model_image, teacher_image  # noqa: E402
from training.params import parse_config  # noqa: E402
from training.precision import autocast_for, input_dtype  # noqa: E402
from training.train import train_step  # noqa: E402
from training.trainer import Trainer  # noqa: E402


def make_run(opts, distill: str, with_teacher: bool):
    argv = ["--model", opts.student, "--dataset-type", "synthetic", "--synthetic-num-samples",
            str(opts.batch_size * 2), "--batch-size", str(opts.batch_size), "--workers", "0", "--logs", "",
            "--precision", opts.precision, "--device", opts.device, "--warmup", "1", "--distill", distill]
    if with_teacher:
        argv += ["--teacher", opts.teacher]
    config = parse_config(argv)
    return Trainer(config, distributed.init_distributed(config.runtime.device))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def write_batch_csv(folder: str, n: int, size: int, seed: int = 0) -> str:
    """n random-noise PNG images (size x size) with captions, as a training CSV."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rows = ["filepath\ttitle"]
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            os.path.join(folder, "images", f"{i}.png"))
        rows.append(f"images/{i}.png\ta photo of random noise number {i}")
    with open(os.path.join(folder, "train.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    return os.path.join(folder, "train.csv")


def make_cache_run(opts, teacher: str, student: str, folder: str):
    """Build a cache of one batch of images with the real builder, and a run that trains from it."""
    from training import cache_teacher

    csv = write_batch_csv(os.path.join(folder, "data"), opts.batch_size, opts.source_size)
    cache_dir = os.path.join(folder, "cache")
    argv = ["--teacher", teacher, "--train-data", csv, "--data-root", os.path.join(folder, "data"), "--views",
            str(opts.views), "--out", cache_dir, "--batch-size", str(opts.batch_size), "--workers", "0",
            "--device", opts.device, "--precision", opts.precision]
    if cache_teacher.main(argv) != 0:
        raise SystemExit("building the benchmark cache failed")
    config = parse_config(["--model", student, "--train-data", csv, "--data-root", os.path.join(folder, "data"),
                       "--batch-size", str(opts.batch_size), "--workers", "0", "--logs", "", "--precision",
                       opts.precision, "--device", opts.device, "--warmup", "1", "--distill", opts.distill,
                       "--teacher-cache", cache_dir])
    return Trainer(config, distributed.init_distributed(config.runtime.device)), cache_dir


def storage_bytes_per_sample(dims: list[int], views: int, samples: int = 2000) -> dict[str, float]:
    """Bytes per sample of a cache shard in every storage format (real files: header, keys, views, hashes)."""
    import tempfile

    from training.teacher_cache import STORAGE_DTYPES, shard_tensors, write_shard

    keys = [f"cc12m/{i:09d}" for i in range(samples)]  # a realistic key length
    gen = torch.Generator().manual_seed(0)
    text = [torch.nn.functional.normalize(torch.randn(samples, d, generator=gen), dim=-1) for d in dims]
    image = [torch.nn.functional.normalize(torch.randn(samples, views, d, generator=gen), dim=-1) for d in dims]
    meta = (torch.zeros(samples, dtype=torch.int64), torch.full((samples, 2), 500),
            torch.zeros(samples, views, 5, dtype=torch.int32))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in STORAGE_DTYPES:
            tensors = shard_tensors(keys, *meta, text, image, dtype)
            out[dtype] = write_shard(os.path.join(tmp, f"{dtype}.safetensors"), keys, tensors, dtype)["bytes"] / samples
    return out


def measure_pair(opts, teacher_name: str, student_name: str, folder: str) -> dict:
    opts.teacher, opts.student = teacher_name, student_name
    student_run = make_run(opts, "task=1", with_teacher=False)
    kd_run = make_run(opts, opts.distill, with_teacher=True)
    device = kd_run.env.device
    batch = next(iter(kd_run.data.dataloader))
    teacher = kd_run.teacher
    student_fmt, teacher_fmt = kd_run.student_bundle.image_format, kd_run.teacher_bundle.image_format
    student_image = model_image(batch["image"], student_fmt, device, input_dtype(opts.precision))
    image = teacher_image(batch, student_image, student_fmt, teacher_fmt, device, input_dtype(opts.precision))
    text = batch.get("teacher_text", batch["text"]).to(device)
    autocast = autocast_for(opts.precision, device)

    def teacher_forward():
        with autocast():
            teacher(image, text)

    steps = {"student step": lambda: train_step(student_run, batch), "teacher fwd": teacher_forward,
             "KD step": lambda: train_step(kd_run, batch)}
    cache_info = None
    if opts.cache:
        cache_run, cache_dir = make_cache_run(opts, teacher_name, student_name, folder)
        cached_batch = next(iter(cache_run.data.dataloader))
        assert "teacher_image_emb" in cached_batch
        steps["cached KD step"] = lambda: train_step(cache_run, cached_batch)
        cache_info = {"dims": teacher.embed_dims, "dir": cache_dir}
    measures = {k: [] for k in steps}
    names = list(steps)
    for i in range(opts.warmup_steps + opts.steps):
        order = names[i % len(names):] + names[:i % len(names)]  # rotate: no measure always runs first
        round_times = {k: timed(steps[k], device) for k in order}
        if i >= opts.warmup_steps:
            for k, v in round_times.items():
                measures[k].append(v)
    ratios = {}
    if "cached KD step" in measures:  # per-round ratios: the rounds pair up the measures, machine drift cancels
        ratios["cached/student"] = statistics.median(
            c / s for c, s in zip(measures["cached KD step"], measures["student step"]))
        ratios["online/cached"] = statistics.median(
            o / c for o, c in zip(measures["KD step"], measures["cached KD step"]))
    student_model = student_run.model
    student_fwd = forward_flops(lambda: student_model(student_image, batch["text"].to(device)))
    flops = {"student fwd": student_fwd, "teacher fwd": forward_flops(teacher_forward)}
    return {"med": {k: statistics.median(v) for k, v in measures.items()}, "device": device, "cache": cache_info,
            "ratios": ratios, "flops": flops}


PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def forward_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return float(counter.get_total_flops())


def peak_flops(opts, device) -> float | None:
    if opts.peak_tflops:
        return opts.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def report(opts, teacher_name: str, student_name: str, result: dict) -> None:
    med, device = result["med"], result["device"]
    overhead = med["KD step"] / (med["student step"] + med["teacher fwd"]) - 1
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"\n{teacher_name} -> {student_name}, batch {opts.batch_size}, {opts.precision}, {dev}, "
          f"spec {opts.distill}, median of {opts.steps}")
    flops, peak = result["flops"], peak_flops(opts, device)
    step_flops = {"student step": 3 * flops["student fwd"], "teacher fwd": flops["teacher fwd"],
                  "KD step": 3 * flops["student fwd"] + flops["teacher fwd"], "cached KD step": 3 * flops["student fwd"]}
    print(f"FLOPs per batch of {opts.batch_size} (FlopCounterMode): student forward {flops['student fwd']:.3e}, "
          f"teacher forward {flops['teacher fwd']:.3e}; a step counts 3 x student forward (+ teacher forward online)"
          + (f"; MFU against a peak of {peak / 1e12:.0f} TFLOP/s" if peak else ""))
    print("| measure | ms | samples/s | GFLOP/s | MFU |")
    print("|---|---:|---:|---:|---:|")
    for k, v in med.items():
        achieved = step_flops[k] / v
        mfu = f"{achieved / peak * 100:.1f}%" if peak else "n/a"
        print(f"| {k} | {v * 1e3:.1f} | {opts.batch_size / v:.0f} | {achieved / 1e9:.1f} | {mfu} |")
    print(f"| **overhead** = KD / (student + teacher) - 1 | {overhead * 100:+.1f}% | |")
    if result["ratios"]:
        r = result["ratios"]
        print(f"| **cached KD / student step** (target <= 1.05; median of per-round ratios) | "
              f"{r['cached/student']:.3f} | |")
        print(f"| **speed-up** of the cached over the online KD step (median of per-round ratios) | "
              f"{r['online/cached']:.2f}x | |")


def report_storage(dims_by_teacher: dict[str, list[int]], views: list[int], pairs: float = 15e6) -> None:
    print(f"\nCache size per sample (measured shard files, 2000 samples each) and for {pairs / 1e6:.0f}M pairs")
    print("| teacher (dim) | views | " + " | ".join(f"{d} B/sample | {d} @{pairs / 1e6:.0f}M" for d in
                                                  ("fp32", "fp16", "bf16", "int8")) + " |")
    print("|---|---:|" + "---:|---:|" * 4)
    for name, dims in dims_by_teacher.items():
        for k in views:
            b = storage_bytes_per_sample(dims, k)
            cells = " | ".join(f"{b[d]:.0f} | {b[d] * pairs / 1e9:.1f} GB" for d in ("fp32", "fp16", "bf16", "int8"))
            print(f"| {name} ({'+'.join(map(str, dims))}) | {k} | {cells} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default="tiny-student")
    p.add_argument("--teacher", default="tiny-teacher")
    p.add_argument("--distill", default="task=1,crd=1,icl=1,fd=2000", help="the KD spec to time")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s for MFU (default: dense bf16 peak of known GPUs)")
    p.add_argument("--cache", action="store_true", help="also time KD from a teacher-embedding cache")
    p.add_argument("--pairs", default=None, help="teacher:student pairs, comma-separated (overrides --teacher/--student)")
    p.add_argument("--views", type=int, default=2, help="--cache: views per sample of the benchmark cache")
    p.add_argument("--source-size", type=int, default=256, help="--cache: side of the cached source images")
    p.add_argument("--storage-teachers", default="ViT-L-14:768,ViT-B-16:512",
                   help="--cache: name:dim list for the bytes-per-sample table (besides the timed teachers)")
    p.add_argument("--storage-views", default="1,4", help="--cache: view counts for the bytes-per-sample table")
    opts = p.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    import tempfile

    pairs = [tuple(x.split(":")) for x in opts.pairs.split(",")] if opts.pairs else [(opts.teacher, opts.student)]
    dims: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (teacher_name, student_name) in enumerate(pairs):
            result = measure_pair(opts, teacher_name, student_name, os.path.join(tmp, str(i)))
            report(opts, teacher_name, student_name, result)
            if result["cache"]:
                dims[teacher_name] = result["cache"]["dims"]
    if opts.cache:
        for item in opts.storage_teachers.split(","):
            if item:
                name, dim = item.split(":")
                dims.setdefault(name, [int(dim)])
        report_storage(dims, [int(v) for v in opts.storage_views.split(",")])


if __name__ == "__main__":
    main()

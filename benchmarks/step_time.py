"""Step-time benchmark: what does distillation cost on top of running the two models?

    python benchmarks/step_time.py                       # tiny configs, CPU
    python benchmarks/step_time.py --student ViT-T-16 --teacher ViT-B-16 --image-size 224 --device cuda \
        --precision amp_bf16 --batch-size 128

Measures, in one run and interleaved (so machine noise hits all of them alike), the median of:
  student step  = a full optimizer step of the student with the task loss only (no teacher)
  teacher fwd   = the frozen teacher's forward on the same batch
  KD step       = a full optimizer step with the teacher and the KD recipe
and reports overhead = KD step / (student step + teacher fwd) - 1 (target <= 10%).
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
from training.main import build  # noqa: E402
from training.params import parse_args  # noqa: E402
from training.train import autocast_for, input_dtype, train_step  # noqa: E402


def make_run(opts, distill: str, with_teacher: bool):
    argv = ["--model", opts.student, "--dataset-type", "synthetic", "--synthetic-num-samples",
            str(opts.batch_size * 2), "--batch-size", str(opts.batch_size), "--workers", "0", "--logs", "",
            "--precision", opts.precision, "--device", opts.device, "--warmup", "1", "--distill", distill]
    if with_teacher:
        argv += ["--teacher", opts.teacher]
    args = parse_args(argv)
    env = distributed.init_distributed(args.device)
    return build(args, env)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


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
    opts = p.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)

    student_run = make_run(opts, "task=1", with_teacher=False)
    kd_run = make_run(opts, opts.distill, with_teacher=True)
    device = kd_run.trainer.env.device
    batch = next(iter(kd_run.data.dataloader))
    teacher = kd_run.trainer.teacher
    image = batch.get("teacher_image", batch["image"]).to(device, dtype=input_dtype(opts.precision))
    text = batch.get("teacher_text", batch["text"]).to(device)
    autocast = autocast_for(opts.precision, device)

    def teacher_forward():
        with autocast():
            teacher(image, text)

    measures = {"student step": [], "teacher fwd": [], "KD step": []}
    for i in range(opts.warmup_steps + opts.steps):
        round_times = {
            "student step": timed(lambda: train_step(student_run.trainer, batch), device),
            "teacher fwd": timed(teacher_forward, device),
            "KD step": timed(lambda: train_step(kd_run.trainer, batch), device),
        }
        if i >= opts.warmup_steps:
            for k, v in round_times.items():
                measures[k].append(v)
    med = {k: statistics.median(v) for k, v in measures.items()}
    overhead = med["KD step"] / (med["student step"] + med["teacher fwd"]) - 1
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"\n{opts.teacher} -> {opts.student}, batch {opts.batch_size}, {opts.precision}, {dev}, "
          f"spec {opts.distill}, median of {opts.steps}")
    print("| measure | ms | samples/s |")
    print("|---|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {v * 1e3:.1f} | {opts.batch_size / v:.0f} |")
    print(f"| **overhead** = KD / (student + teacher) - 1 | {overhead * 100:+.1f}% | |")


if __name__ == "__main__":
    main()

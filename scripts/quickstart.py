"""The embedded demo: world -> teacher -> KD student and no-KD baseline -> evaluation table.

Run through `bash scripts/quickstart.sh` (which also creates the environment). Everything is offline and
deterministic by seed. Each training run is the real CLI (`python -m training.main`), so this is also the
smallest complete example of how to use the project.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

import training  # noqa: F401  (registers the tiny configs with open_clip)
from training.config import DataConfig, EvalConfig, RuntimeConfig
from training.data.transforms import EvalTransform, ImageFormat
from training.demo.world import generate_world
from training.eval.hook import TrainingEvaluator
from training.models import create_clip


def sh(cmd: list[str], log_path: str, threads: int | None = None) -> None:
    """Run one CLI step, its output in a log file; on failure, show the tail and stop."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    with open(log_path, "w") as log:
        result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        with open(log_path) as f:
            sys.stderr.write("".join(f.readlines()[-30:]))
        raise SystemExit(f"step failed ({result.returncode}), full log {log_path}: {' '.join(cmd)}")


def train(out: str, name: str, model: str, world, epochs: int, extra: list[str], threads: int) -> str:
    cmd = [sys.executable, "-m", "training.main", "--model", model, "--train-data", world.train_csv,
           "--data-root", world.data_root, "--batch-size", "64", "--epochs", str(epochs), "--lr", "2e-3",
           "--wd", "0.1", "--warmup", "50", "--precision", "fp32", "--device", "cpu",
           "--workers", "1", "--logs", os.path.join(out, "runs"), "--name", name, "--log-every-n-steps", "50",
           "--zeroshot-frequency", "0", "--val-frequency", "0", "--seed", "0", "--save-frequency", str(epochs),
           *extra]
    start = time.time()
    log_path = os.path.join(out, f"{name}.log")
    sh(cmd, log_path, threads)
    print(f"  trained {name:<9} ({model}) in {time.time() - start:5.0f}s  log: {log_path}", flush=True)
    return os.path.join(out, "runs", name, "checkpoints", f"epoch_{epochs}.pt")


def evaluate(arch: str, ckpt: str, world) -> dict[str, float]:
    model = create_clip(arch, ckpt, torch.device("cpu")).eval()
    import open_clip

    evaluator = TrainingEvaluator(EvalConfig(zeroshot_data=world.zeroshot_dir, zeroshot_frequency=1, val_frequency=1),
                                  DataConfig(val_data=world.val_csv, data_root=world.data_root, batch_size=128,
                                             workers=0), RuntimeConfig(precision=None))
    return evaluator(model, EvalTransform(ImageFormat.from_model(model)), open_clip.get_tokenizer(arch), 1,
                     torch.device("cpu"))


@dataclass
class Budget:
    """The demo's fixed budget (also used by benchmarks/methods.py, so its rows are comparable)."""

    seed: int = 0
    num_train: int = 4000
    teacher_epochs: int = 8
    student_epochs: int = 6


def prepare_teacher(out: str, threads: int, budget: Budget | None = None):
    """World + trained teacher, reused when `out` already holds them (delete out/teacher.pt to retrain)."""
    budget = budget or Budget()
    os.makedirs(out, exist_ok=True)
    world = generate_world(os.path.join(out, "world"), seed=budget.seed, num_train=budget.num_train)
    print(f"[1/4] world: {world.num_train} train pairs, {world.num_val} val pairs, "
          f"{world.num_zeroshot} zero-shot images in {len(world.classnames)} classes", flush=True)
    teacher_file = os.path.join(out, "teacher.pt")
    if os.path.isfile(teacher_file):
        print(f"[2/4] reusing the trained teacher {teacher_file}", flush=True)
        return world, teacher_file, budget
    print("[2/4] training the teacher (tiny-teacher, contrastive task loss only)", flush=True)
    teacher_ckpt = train(out, "teacher", "tiny-teacher", world, budget.teacher_epochs, ["--distill", "task=1"],
                         threads)
    sh([sys.executable, "-m", "training.export", teacher_ckpt, teacher_file], os.path.join(out, "export.log"))
    return world, teacher_file, budget


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo")
    p.add_argument("--seed", type=int, default=Budget.seed)
    p.add_argument("--num-train", type=int, default=Budget.num_train)
    p.add_argument("--teacher-epochs", type=int, default=Budget.teacher_epochs)
    p.add_argument("--student-epochs", type=int, default=Budget.student_epochs)
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    opts = p.parse_args()
    torch.set_num_threads(opts.threads)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights" notes: we load our own
    t0 = time.time()
    budget = Budget(opts.seed, opts.num_train, opts.teacher_epochs, opts.student_epochs)
    world, teacher_file, _ = prepare_teacher(opts.out, opts.threads, budget)

    print("[3/4] distilling the student with the CLIP-KD recipe, and a no-KD baseline", flush=True)
    kd_ckpt = train(opts.out, "kd", "tiny-student", world, budget.student_epochs,
                    ["--teacher", "tiny-teacher", "--teacher-pretrained", teacher_file, "--recipe", "clip-kd"],
                    opts.threads)
    base_ckpt = train(opts.out, "baseline", "tiny-student", world, budget.student_epochs, ["--distill", "task=1"],
                      opts.threads)

    print("[4/4] evaluating", flush=True)
    rows = {"teacher (tiny-teacher)": evaluate("tiny-teacher", teacher_file, world),
            "student, CLIP-KD": evaluate("tiny-student", kd_ckpt, world),
            "student, no KD (baseline)": evaluate("tiny-student", base_ckpt, world)}
    teacher = rows["teacher (tiny-teacher)"]
    zs, i2t, t2i = "zeroshot/top1", "retrieval/image_to_text_R@1", "retrieval/text_to_image_R@1"
    print("\n| model | zero-shot top-1 | I→T R@1 | T→I R@1 | retention: zero-shot / I→T / T→I |")
    print("|---|---:|---:|---:|---:|")
    for name, m in rows.items():
        retention = " / ".join(f"{100 * m[k] / teacher[k]:.0f}%" if teacher[k] else "n/a" for k in (zs, i2t, t2i))
        print(f"| {name} | {100 * m[zs]:.1f} | {100 * m[i2t]:.1f} | {100 * m[t2i]:.1f} | {retention} |")
    print(f"\nquickstart finished in {time.time() - t0:.0f}s; runs, logs and checkpoints are in {opts.out}/")


if __name__ == "__main__":
    main()

"""INT8 deployment of an image-only student on the embedded world: zero-shot top-1 and CPU latency, FP32 vs INT8.

    python benchmarks/int8.py --out demo        # reuses the quickstart's world and teacher when present

1. trains an image-only student (`--student-kind image`, timm resnet18 at 32 px, emb regression of the teacher's
   image embedding, 1 epoch over the world's caption images, no caption used) with the quickstart's teacher;
   its zero-shot head comes from the teacher's text tower and the world's class names;
2. exports it with `python -m training.export CKPT DIR --onnx --onnx-int8` (INT8 calibrated on --calib-images
   training images);
3. scores zero-shot top-1 on the world's class folder with the PyTorch checkpoint, the FP32 ONNX file and the INT8
   file (all through training.predict's predictors, as a user runs them), and times FP32 vs INT8 onnxruntime at
   batch 1 and 8, interleaved (median of --rounds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

from quickstart import TEACHER, prepare_teacher, sh  # noqa: E402

from training.data.imagefolder import read_image_folders  # noqa: E402
from training.data.transforms import EvalTransform  # noqa: E402
from training.predict import load_predictor  # noqa: E402


def top1(predictor, folder: str) -> float:
    table = read_image_folders([folder])
    tf = EvalTransform(predictor.image_format)
    hits = 0
    for i in range(0, len(table.images), 64):
        x = torch.stack([tf(Image.open(p).convert("RGB")) for p in table.images[i:i + 64]])
        hits += int((predictor.head_logits(x).argmax(1) == torch.tensor(table.labels[i:i + 64])).sum())
    return 100.0 * hits / len(table.images)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--calib-images", type=int, default=256)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    opts = p.parse_args()
    torch.set_num_threads(opts.threads)
    t0 = time.time()
    world, teacher_file, _ = prepare_teacher(opts.out, opts.threads)
    work = os.path.join(opts.out, "int8")
    os.makedirs(work, exist_ok=True)
    images = os.path.join(world.data_root, "images", "train")
    cmd = [sys.executable, "-m", "training.main", "--student-kind", "image", "--model", opts.model,
           "--force-image-size", str(opts.image_size), "--teacher", TEACHER, "--teacher-pretrained",
           teacher_file, "--train-data", images, "--zeroshot-data", world.zeroshot_dir, "--batch-size", "32",
           "--epochs", "1", "--lr", "2e-3", "--wd", "0.05", "--warmup", "20", "--precision", "fp32", "--device", "cpu",
           "--workers", "1", "--logs", os.path.join(work, "runs"), "--name", "student", "--log-every-n-steps", "50",
           "--val-frequency", "0", "--seed", "0"]
    sh(cmd, os.path.join(work, "train.log"), opts.threads)
    ckpt = os.path.join(work, "runs", "student", "checkpoints", "epoch_1.pt")
    onnx_dir = os.path.join(work, "onnx")
    sh([sys.executable, "-m", "training.export", ckpt, onnx_dir, "--onnx", "--onnx-int8", "--calib-images",
        str(opts.calib_images)], os.path.join(work, "export.log"), opts.threads)
    fp32, int8 = os.path.join(onnx_dir, "image_encoder.onnx"), os.path.join(onnx_dir, "image_encoder.int8.onnx")
    acc = {name: top1(load_predictor(path, None), world.zeroshot_dir)
           for name, path in (("PyTorch", ckpt), ("onnxruntime fp32", fp32), ("onnxruntime int8", int8))}

    runners = {name: load_predictor(path, None) for name, path in (("fp32", fp32), ("int8", int8))}
    inputs = {b: torch.randn(b, 3, opts.image_size, opts.image_size) for b in (1, 8)}
    times: dict = {(n, b): [] for n in runners for b in inputs}
    for pred in runners.values():
        for x in inputs.values():
            pred.head_logits(x)
    for _ in range(opts.rounds):
        for n, pred in runners.items():
            for b, x in inputs.items():
                start = time.perf_counter()
                for _ in range(20):
                    pred.head_logits(x)
                times[(n, b)].append((time.perf_counter() - start) / 20)
    med = {k: statistics.median(v) for k, v in times.items()}
    sizes = {n: os.path.getsize(p) / 2 ** 20 for n, p in (("fp32", fp32), ("int8", int8))}
    print(f"\n{opts.model} image student at {opts.image_size} px, zero-shot on the world's class folder "
          f"({len(read_image_folders([world.zeroshot_dir]).images)} images, 8 classes, chance 12.5); "
          f"{opts.threads} threads\n")
    print("| file | size (MiB) | zero-shot top-1 | batch 1 (ms) | batch 8 (ms) | batch 8 (images/s) |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| PyTorch checkpoint | | {acc['PyTorch']:.1f} | | | |")
    for n in ("fp32", "int8"):
        print(f"| onnxruntime {n} | {sizes[n]:.1f} | {acc['onnxruntime ' + n]:.1f} | {1000 * med[(n, 1)]:.2f} | "
              f"{1000 * med[(n, 8)]:.2f} | {8 / med[(n, 8)]:.0f} |")
    print(f"\nINT8 vs FP32: top-1 {acc['onnxruntime int8'] - acc['onnxruntime fp32']:+.1f} points, speed-up "
          f"{med[('fp32', 1)] / med[('int8', 1)]:.2f}x (batch 1), {med[('fp32', 8)] / med[('int8', 8)]:.2f}x "
          f"(batch 8); {time.time() - t0:.0f}s in total")


if __name__ == "__main__":
    main()

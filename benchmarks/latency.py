"""Image-encoder latency and throughput on this CPU: an image-only student vs a CLIP teacher, PyTorch and onnxruntime,
batch 1 and 8, measured interleaved in one run.

    python benchmarks/latency.py [--student resnet18] [--teacher ViT-B-32] [--size 224] [--threads 2]

The student is `--student-kind image`'s model (the timm trunk + the projection to the teacher's width; its class
head costs one [B, D] x [D, C] product), the teacher the open_clip image tower, both built from their configs
(random weights: latency does not depend on them), fp32. onnxruntime runs the files `python -m training.export
--onnx` writes (training.onnx_export), plus the student's static INT8 file calibrated on random images (latency
only; accuracy of INT8 is benchmarks/int8.py's). Each round times every configuration once (--iters forward passes
after one warm-up); the table reports the median over --rounds, so machine-load drift hits all rows alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from training.models import create_clip
from training.models.image_student import create_image_student
from training.onnx_export import ClipImageEncoder, export_module, parity, quantize_int8, session


def _torch_runner(module):
    def run(x):
        with torch.no_grad():
            module(x)
    return run


def _ort_runner(path):
    sess = session(path)
    name = sess.get_inputs()[0].name

    def run(x):
        sess.run(None, {name: x.numpy()})
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default="resnet18")
    p.add_argument("--teacher", default="ViT-B-32")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=5)
    opts = p.parse_args()
    torch.set_num_threads(opts.threads)
    os.environ["OMP_NUM_THREADS"] = str(opts.threads)
    torch.manual_seed(0)
    teacher = ClipImageEncoder(create_clip(opts.teacher, None, torch.device("cpu"))).eval()
    dim = int(teacher(torch.zeros(1, 3, opts.size, opts.size)).shape[-1])
    student = create_image_student(opts.student, "image", dim, force_image_size=opts.size).eval()
    work = tempfile.mkdtemp(prefix="latency-")
    example = torch.randn(3, 3, opts.size, opts.size)
    runners = {}
    for name, module in (("student", student), ("teacher", teacher)):
        path = os.path.join(work, f"{name}.onnx")
        export_module(module, example, path, "image", "embedding", {"kind": name})
        assert parity(module, path, example) <= 1e-4
        runners[(name, "PyTorch fp32")] = _torch_runner(module)
        runners[(name, "onnxruntime fp32")] = _ort_runner(path)
    calib = [f"{work}/calib{i}.png" for i in range(32)]
    from PIL import Image

    for i, path in enumerate(calib):
        g = torch.Generator().manual_seed(i)
        Image.fromarray((torch.rand(opts.size, opts.size, 3, generator=g) * 255).byte().numpy()).save(path)
    quantize_int8(os.path.join(work, "student.onnx"), os.path.join(work, "student.int8.onnx"), calib,
                  student.image_format)
    runners[("student", "onnxruntime int8")] = _ort_runner(os.path.join(work, "student.int8.onnx"))

    times: dict = {(k, b): [] for k in runners for b in (1, 8)}
    inputs = {b: torch.randn(b, 3, opts.size, opts.size) for b in (1, 8)}
    for run in runners.values():  # warm-up
        for b in (1, 8):
            run(inputs[b])
    for _ in range(opts.rounds):
        for key, run in runners.items():
            for b in (1, 8):
                start = time.perf_counter()
                for _ in range(opts.iters):
                    run(inputs[b])
                times[(key, b)].append((time.perf_counter() - start) / opts.iters)
    median = {k: statistics.median(v) for k, v in times.items()}
    params = {"student": sum(q.numel() for q in student.parameters()) / 1e6,
              "teacher": sum(q.numel() for q in teacher.clip.visual.parameters()) / 1e6}  # the image tower only
    print(f"{opts.size}x{opts.size}, fp32 unless said, {opts.threads} threads, median of {opts.rounds} rounds x "
          f"{opts.iters} passes\n")
    print("| model | runtime | batch | latency (ms / batch) | throughput (images/s) | student speed-up |")
    print("|---|---|---:|---:|---:|---:|")
    for (model, backend), b in sorted(median, key=lambda k: (k[1], k[0][1], k[0][0])):
        t = median[((model, backend), b)]
        label = {"student": f"student ({opts.student}, {params['student']:.1f}M)",
                 "teacher": f"teacher ({opts.teacher} image tower, {params['teacher']:.1f}M)"}[model]
        ref = median.get((("teacher", backend.replace("int8", "fp32")), b))
        speed = f"{ref / t:.1f}x" if model == "student" and ref else ""
        print(f"| {label} | {backend} | {b} | {1000 * t:.1f} | {b / t:.0f} | {speed} |")


if __name__ == "__main__":
    main()

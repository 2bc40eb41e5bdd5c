"""FLIP patch dropout (--force-patch-dropout) as a speed lever: a student ViT's training step with and without it.

    python benchmarks/patch_dropout.py --threads 2                        # ViT-T-16, 224 px, CPU
    python benchmarks/patch_dropout.py --device cuda --batch-size 256 --precision amp_bf16

Interleaved in one run (machine noise hits every setting alike): the median time of a full optimizer step (task
loss, AdamW) of the student built by training.models.create_student at each --ratios value, and its ratio to the
step without dropout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from training.config import ModelConfig  # noqa: E402
from training.distill import build_distill_loss  # noqa: E402
from training.models import create_student, embed_dim  # noqa: E402
from training.precision import autocast_for  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-T-16")
    p.add_argument("--ratios", default="0,0.5,0.75")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ratios = [float(r) for r in args.ratios.split(",")]
    setups = []
    for r in ratios:
        torch.manual_seed(0)
        bundle = create_student(ModelConfig(model=args.model, force_patch_dropout=r or None), device)
        model = bundle.model.train()
        loss = build_distill_loss("task=1", student_dim=embed_dim(model), teacher_dim=None).to(device)
        opt = torch.optim.AdamW(list(model.parameters()) + list(loss.parameters()), lr=1e-4)
        setups.append((r, model, loss, opt))
    size = setups[0][1].visual.image_size
    images = torch.randn(args.batch_size, 3, *size, device=device)
    texts = torch.randint(1, 49407, (args.batch_size, 77), device=device)

    def step(model, loss, opt):
        with autocast_for(args.precision, device)():
            img = model.encode_image(images)
            txt = model.encode_text(texts)
            out = loss(student_image=img, student_text=txt, student_scale=model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        out["total"].backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {r: [] for r in ratios}
    for i in range(args.steps + 1):
        for r, model, loss, opt in setups:
            t0 = time.perf_counter()
            step(model, loss, opt)
            if i:  # the first round warms up
                times[r].append(time.perf_counter() - t0)
    base = statistics.median(times[ratios[0]])
    print(f"{args.model}, batch {args.batch_size}, {size[0]} px, {args.precision} on {device}, "
          f"{args.threads} threads, median of {args.steps}")
    print("| --force-patch-dropout | step ms | vs no dropout |\n|---:|---:|---:|")
    for r in ratios:
        m = statistics.median(times[r])
        print(f"| {r:g} | {m * 1000:.1f} | {m / base:.2f}x |")


if __name__ == "__main__":
    main()

"""What each preparation of the frozen teacher buys (models/teacher.py), interleaved in one run:

    python benchmarks/teacher_forward.py                                  # ViT-B-32, batch 8, CPU, amp_bf16
    python benchmarks/teacher_forward.py --device cuda --precision amp --batch-size 256 --compile

Medians of the teacher's forward on one batch, in the student's autocast of --precision:
  before        fp32 frozen weights (requires_grad False), no_grad, both towers: the teacher as it was, where autocast
                casts every weight per forward and matmul runs attention in-projections as a bmm on per-position
                copies of the weight (see models/teacher.py)
  open_clip_train  fp32 weights left requiring grad, no_grad, both towers: open_clip_train's --distill teacher
                (autocast caches its weight casts; matmul folds the in-projections)
  low precision the weights kept in teacher_dtype(--precision), inference_mode (Teacher.prepare)
  + compile     the same, torch.compile'd with static shapes (--compile; compile time reported apart)
  image only    low precision, with only the image tower run (a spec whose terms read no teacher text, e.g. emb)
and each one's speed-up over `before`.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from training.models import Teacher, create_clip  # noqa: E402
from training.models.teacher import teacher_dtype  # noqa: E402
from training.precision import resolve  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="ViT-B-32")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", default="amp_bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--compile", action="store_true")
    opts = p.parse_args()
    device = torch.device(opts.device)
    precision = resolve(opts.precision, device)
    torch.manual_seed(0)
    member = create_clip(opts.teacher, None, device)
    size = member.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    image = torch.randn(opts.batch_size, 3, size, size, device=device, dtype=precision.batch_dtype)
    text = torch.randint(1, 1000, (opts.batch_size, member.context_length), device=device)

    dtype = teacher_dtype(opts.precision, device)
    variants = {"before": Teacher([copy.deepcopy(member)]), "open_clip_train": Teacher([copy.deepcopy(member)])}
    variants["before"].requires_grad_(False)
    for name in ("before", "open_clip_train"):
        if precision.low_precision_weights:  # --precision bf16: the teacher was already cast whole
            variants[name].to(precision.low_precision_weights)
    fast = Teacher([copy.deepcopy(member)])
    fast.prepare(dtype)
    variants["low precision"] = fast
    if opts.compile:
        compiled = Teacher([copy.deepcopy(member)])
        compiled.prepare(dtype, compile=True)
        start = time.perf_counter()
        with precision.autocast():
            compiled(image, text)
        sync(device)
        print(f"compile (first call): {time.perf_counter() - start:.1f} s")
        variants["+ compile"] = compiled
    image_only = Teacher([copy.deepcopy(member)])
    image_only.prepare(dtype)
    image_only.set_outputs(["image"])
    variants["image only"] = image_only

    def forward(name: str) -> float:
        teacher = variants[name]
        sync(device)
        start = time.perf_counter()
        with precision.autocast():
            if name in ("before", "open_clip_train"):
                with torch.no_grad():
                    teacher.members[0].encode_image(image)
                    teacher.members[0].encode_text(text)
            else:
                teacher(image, text)
        sync(device)
        return time.perf_counter() - start

    for name in variants:  # warm-up
        forward(name)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(opts.rounds):
        for name in variants:
            times[name].append(forward(name))
    print(f"{opts.teacher}, batch {opts.batch_size}, --precision {opts.precision} on {device} (teacher weights "
          f"{str(dtype or torch.float32).replace('torch.', '')}), {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| teacher forward | median (ms) | speed-up |\n|---|---|---|")
    base = statistics.median(times["before"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1e3:.1f} | {base / median:.2f}x |")


if __name__ == "__main__":
    main()

"""Every distillation method on the embedded world, at one fixed budget: an honest comparison table.

    python benchmarks/methods.py --out demo            # reuses the quickstart's world and teacher when present

One row per method: each term alone (with the task loss) at its preset weight, then every recipe, next to the
no-KD baseline and the teacher. Student, data, steps, seed and learning rate are identical across rows.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

from quickstart import evaluate, prepare_teacher, train  # noqa: E402

TERMS = [("crd", "task=1,crd=1"), ("fd", "task=1,fd=2000"), ("mfd", "task=1,mfd=2000"), ("icl", "task=1,icl=1"),
         ("xkd", "task=1,xkd=1"), ("gd", "task=1,gd=1"), ("afd", "task=1,afd=1"), ("sim", "task=1,sim=1"),
         ("emb", "task=1,emb=1"), ("feat", "task=1,feat=1")]
RECIPES = ["clip-kd", "tinyclip", "mobileclip", "distillclip", "open_clip", "nvidia"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo")
    p.add_argument("--student-epochs", type=int, default=None, help="default: the quickstart's")
    p.add_argument("--only", default=None, help="comma list of row names to run (default: all)")
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    opts = p.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    t0 = time.time()
    world, teacher_file, qs = prepare_teacher(opts.out, opts.threads)
    epochs = opts.student_epochs or qs.student_epochs
    kd = ["--teacher", "tiny-teacher", "--teacher-pretrained", teacher_file]
    runs = [("no KD (baseline)", ["--distill", "task=1"])]
    runs += [(f"task + {name}", [*kd, "--distill", spec]) for name, spec in TERMS]
    runs += [(f"recipe {r}", [*kd, "--recipe", r]) for r in RECIPES]
    if opts.only:
        wanted = set(opts.only.split(","))
        runs = [r for r in runs if r[0] in wanted]
    rows = [("teacher (tiny-teacher)", "—", evaluate("tiny-teacher", teacher_file, world))]
    for label, extra in runs:
        name = "methods-" + "".join(c if c.isalnum() else "_" for c in label)
        ckpt = train(opts.out, name, "tiny-student", world, epochs, extra, opts.threads)
        spec = extra[extra.index("--distill") + 1] if "--distill" in extra else extra[-1]
        rows.append((label, spec, evaluate("tiny-student", ckpt, world)))
    base = rows[1][2] if len(rows) > 1 else None
    print(f"\ntiny-teacher -> tiny-student, {epochs} epochs of {world.num_train} pairs, seed 0\n")
    print("| method | spec / recipe | zero-shot top-1 | I→T R@1 | T→I R@1 | Δ top-1 vs baseline |")
    print("|---|---|---:|---:|---:|---:|")
    for label, spec, m in rows:
        delta = f"{100 * (m['zeroshot/top1'] - base['zeroshot/top1']):+.1f}" if base and label != rows[0][0] else ""
        print(f"| {label} | `{spec}` | {100 * m['zeroshot/top1']:.1f} | "
              f"{100 * m['retrieval/image_to_text_R@1']:.1f} | {100 * m['retrieval/text_to_image_R@1']:.1f} | "
              f"{delta} |")
    print(f"\n(finished in {time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()

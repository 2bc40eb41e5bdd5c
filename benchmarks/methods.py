"""Every distillation method on the embedded world, at one fixed budget, over seeds: an honest comparison table.

    python benchmarks/methods.py --out demo --seeds 0,1,2      # reuses the quickstart's world and teacher

One row per method: each term alone (with the task loss) at its preset weight, then every recipe, next to the
no-KD baseline and the teacher. Student, data (the world's distillation set), steps and learning rate are identical
across rows; each seed changes the students' initialisation, data order and augmentation (the world and the
teacher stay fixed). Cells are the mean over seeds with the spread (min–max) in brackets; Δ is the KD − baseline
margin per seed, its mean and spread.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

from quickstart import I2T, STUDENT, T2I, TEACHER, ZS, evaluate, kd_flags, prepare_teacher, train  # noqa: E402

TERMS = [("crd", "task=1,crd=1"), ("fd", "task=1,fd=2000"), ("icl", "task=1,icl=1"), ("xkd", "task=1,xkd=1"),
         ("gd", "task=1,gd=1"), ("afd", "task=1,afd=1"), ("sim", "task=1,sim=1"), ("emb", "task=1,emb=1"),
         ("feat", "task=1,feat=1")]
# the sigmoid rows: the demo teacher is a CLIP model (no logit bias), so sig_kd is given SigLIP's initial bias
SIGMOID = [("task_siglip", "task_siglip=1", []), ("task_siglip + crd", "task_siglip=1,crd=1", []),
           ("sig_kd", "task=1,sig_kd=1", ["--teacher-logit-biases=-10"]),
           ("task_siglip + sig_kd", "task_siglip=1,sig_kd=1", ["--teacher-logit-biases=-10"])]
RECIPES = ["clip-kd", "tinyclip", "mobileclip", "distillclip", "open_clip", "nvidia"]


def spread(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} [{min(values):.1f}, {max(values):.1f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo")
    p.add_argument("--seeds", default="0", help="comma list of student seeds, e.g. 0,1,2")
    p.add_argument("--student-epochs", type=int, default=None, help="default: the quickstart's")
    p.add_argument("--only", default=None,
                   help="comma list of rows to run besides the baseline: term names (fd, task_siglip+sig_kd, ...) or recipe names "
                        "(clip-kd is the quickstart's KD student) (default: all)")
    opts = p.parse_args()
    seeds = [int(s) for s in opts.seeds.split(",")]
    logging.getLogger().setLevel(logging.ERROR)
    t0 = time.time()
    world, teacher_file, budget = prepare_teacher(opts.out, 2)
    epochs = opts.student_epochs or budget.student_epochs
    runs = [(f"task + {name}", name, ["--distill", spec]) for name, spec in TERMS]
    runs += [(name, name.replace(" + ", "+"), [*flags, "--distill", spec]) for name, spec, flags in SIGMOID]
    runs += [(f"recipe {r}", r, ["--recipe", r]) for r in RECIPES]
    if opts.only:
        wanted = set(opts.only.split(","))
        runs = [r for r in runs if r[1] in wanted]
    runs = [("no KD (baseline)", "baseline", ["--distill", "task=1"], False)] + [(*r, True) for r in runs]
    teacher = evaluate(TEACHER, teacher_file, world)
    results: dict[str, list[dict]] = {}
    for label, key, extra, kd in runs:
        for seed in seeds:
            name = f"methods-{key}-s{seed}"
            ckpt = train(opts.out, name, STUDENT, world, epochs, budget.student_lr,
                         [*(kd_flags(teacher_file) if kd else []), *extra], budget.threads, data=world.distill_csv,
                         seed=seed)
            results.setdefault(label, []).append(evaluate(STUDENT, ckpt, world))
    base = results["no KD (baseline)"]
    print(f"\n{TEACHER} -> {STUDENT}, {epochs} epochs of the {world.num_distill}-pair distillation set, seeds "
          f"{opts.seeds}; chance: zero-shot {100 * world.chance:.1f}, R@1 {100 / world.num_val:.1f}\n")
    print("| method | spec / recipe | zero-shot top-1 | I→T R@1 | T→I R@1 | Δ top-1 vs baseline |")
    print("|---|---|---:|---:|---:|---:|")
    print(f"| teacher ({TEACHER}) | — | {100 * teacher[ZS]:.1f} | {100 * teacher[I2T]:.1f} | "
          f"{100 * teacher[T2I]:.1f} | |")
    for label, _, extra, _ in runs:
        ms = results[label]
        cells = [spread([100 * m[k] for m in ms]) for k in (ZS, I2T, T2I)]
        delta = spread([100 * (m[ZS] - b[ZS]) for m, b in zip(ms, base)]) if label != runs[0][0] else ""
        print(f"| {label} | `{extra[-1]}` | {' | '.join(cells)} | {delta} |")
    print(f"\n(finished in {time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()

"""The embedded demo: world -> teacher -> CLIP-KD student and no-KD baseline -> table and demo/report.png.

Run through `bash scripts/quickstart.sh` (which also creates the environment). Everything is offline and
deterministic by seed at a fixed thread count. Each training run is the real CLI (`python -m training.main`), so this
is also the smallest complete example of how to use the project. The regime is the one where distillation pays:
the teacher ("pretrained") sees the whole training split; both students see only the small distillation set
(`distill.csv`, its first rows), for the same steps, with the same flags, the KD student with the teacher's targets.
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

import training  # noqa: F401  (registers the demo configs with open_clip)
from training.config import DataConfig, EvalConfig, RuntimeConfig
from training.data.transforms import EvalTransform, ImageFormat
from training.demo.world import generate_world
from training.eval.hook import TrainingEvaluator
from training.models import create_clip

TEACHER, STUDENT = "demo-teacher", "demo-student"
ZS, I2T, T2I = "zeroshot/top1", "retrieval/image_to_text_R@1", "retrieval/text_to_image_R@1"
METRICS = {ZS: "zero-shot top-1", I2T: "I→T R@1", T2I: "T→I R@1"}


@dataclass
class Budget:
    """The demo's fixed budget (also used by benchmarks/methods.py, so its rows are comparable)."""

    seed: int = 0  # the world's seed; the students' training seed is given per run
    num_train: int = 6000  # the teacher's pairs
    num_distill: int = 1000  # the students' pairs (the first rows of the teacher's)
    teacher_epochs: int = 5
    student_epochs: int = 10
    teacher_lr: float = 2e-3
    # high for 150 steps of a small model; of 2e-3..1.2e-2 the best for KD (the baseline's best, 5e-3, is in README)
    student_lr: float = 1.2e-2
    eval_every: int = 2  # students: zero-shot and retrieval every N epochs (the curves of report.png)
    threads: int = 2  # fixed, not the machine's core count: the same thread count gives the same numbers


def sh(cmd: list[str], log_path: str, threads: int | None = None) -> None:
    """Run one CLI step: its log lines go to `log_path`, its progress bar (stderr) streams to this terminal."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else dict(os.environ)
    with open(log_path, "w") as log:
        result = subprocess.run(cmd, stdout=log, stderr=None, env=env)
    if result.returncode != 0:
        with open(log_path) as f:
            sys.stderr.write("".join(f.readlines()[-30:]))
        raise SystemExit(f"step failed ({result.returncode}), full log {log_path}: {' '.join(cmd)}")


def train(out: str, name: str, model: str, world, epochs: int, lr: float, extra: list[str], threads: int,
          data: str | None = None, seed: int = 0, eval_every: int = 0) -> str:
    """Train with the CLI; returns the final checkpoint. `eval_every` > 0: zero-shot + retrieval every N epochs."""
    cmd = [sys.executable, "-m", "training.main", "--model", model, "--train-data", data or world.train_csv,
           "--data-root", world.data_root, "--batch-size", "64", "--epochs", str(epochs), "--lr", str(lr),
           "--beta2", "0.98", "--eps", "1e-6", "--wd", "0.1", "--warmup", "50", "--precision", "fp32", "--device", "cpu",
           "--workers", "1", "--logs", os.path.join(out, "runs"), "--name", name, "--log-every-n-steps", "20",
           "--seed", str(seed), "--save-frequency", str(epochs), "--report-to", "tensorboard",
           "--zeroshot-frequency", str(eval_every), "--val-frequency", str(eval_every), *extra]
    if eval_every:
        cmd += ["--zeroshot-data", world.zeroshot_dir, "--val-data", world.val_csv]
    start = time.time()
    log_path = os.path.join(out, f"{name}.log")
    sh(cmd, log_path, threads)
    seconds = time.time() - start
    TIMES[name] = seconds
    print(f"  trained {name} ({model}) in {seconds:.0f}s  log: {log_path}", flush=True)
    return os.path.join(out, "runs", name, "checkpoints", f"epoch_{epochs}.pt")


TIMES: dict[str, float] = {}  # run name -> seconds (the table's "took" column)


def evaluate(arch: str, ckpt: str, world) -> dict[str, float]:
    model = create_clip(arch, ckpt, torch.device("cpu")).eval()
    import open_clip

    evaluator = TrainingEvaluator(EvalConfig(zeroshot_data=world.zeroshot_dir, zeroshot_frequency=1, val_frequency=1),
                                  DataConfig(val_data=world.val_csv, data_root=world.data_root, batch_size=128,
                                             workers=0), RuntimeConfig(precision=None))
    return evaluator(model, EvalTransform(ImageFormat.from_model(model)), open_clip.get_tokenizer(arch), 1,
                     torch.device("cpu"))


def make_world(out: str, budget: Budget):
    return generate_world(os.path.join(out, "world"), seed=budget.seed, num_train=budget.num_train,
                          num_distill=budget.num_distill)


def prepare_teacher(out: str, threads: int, budget: Budget | None = None):
    """World + trained teacher, reused when `out` already holds them (delete out/teacher.pt to retrain)."""
    from training.export import export_student

    budget = budget or Budget()
    os.makedirs(out, exist_ok=True)
    world = make_world(out, budget)
    print(f"[1/5] world: {world.num_train} train pairs ({world.num_distill} of them the students' distillation "
          f"set), {world.num_val} val pairs, {world.num_zeroshot} zero-shot images in {len(world.classnames)} "
          f"classes (chance {100 * world.chance:.1f}%), {world.image_size}px", flush=True)
    teacher_file = os.path.join(out, "teacher.pt")
    if os.path.isfile(teacher_file):
        print(f"[2/5] reusing the trained teacher {teacher_file}", flush=True)
        return world, teacher_file, budget
    print(f"[2/5] training the teacher ({TEACHER}, contrastive task loss, {budget.teacher_epochs} epochs of "
          f"{world.num_train} pairs)", flush=True)
    teacher_ckpt = train(out, "teacher", TEACHER, world, budget.teacher_epochs, budget.teacher_lr,
                         ["--distill", "task=1"], threads)
    export_student(teacher_ckpt, teacher_file, TEACHER)
    return world, teacher_file, budget


def kd_flags(teacher_file: str) -> list[str]:
    return ["--teacher", TEACHER, "--teacher-pretrained", teacher_file]


def train_students(out: str, world, teacher_file: str, budget: Budget, seed: int, suffix: str = "") -> dict:
    """The CLIP-KD student and the no-KD baseline at the same budget; returns {name: checkpoint}."""
    common = dict(data=world.distill_csv, seed=seed, eval_every=budget.eval_every)
    runs = {}
    for name, extra in ((f"kd{suffix}", [*kd_flags(teacher_file), "--recipe", "clip-kd"]),
                        (f"baseline{suffix}", ["--distill", "task=1"])):
        runs[name] = train(out, name, STUDENT, world, budget.student_epochs, budget.student_lr, extra, budget.threads,
                           **common)
    return runs


def curves(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """The TensorBoard scalars of one run: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def write_report(path: str, runs: dict[str, str], rows: dict[str, dict], title: str) -> None:
    """report.png: the students' curves (loss, zero-shot top-1, I→T R@1) and the retention bars per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    colours = {"KD": "tab:blue", "baseline": "tab:orange", "teacher": "tab:gray"}
    for label, run_dir in runs.items():
        c = curves(run_dir)
        for ax, tag, name in ((axes[0], "train/total", "training loss (total)"),
                              (axes[1], f"eval/{ZS}", "zero-shot top-1 (%)"),
                              (axes[2], f"eval/{I2T}", "I→T R@1 (%)")):
            points = c.get(tag, [])
            scale = 1 if tag.startswith("train") else 100
            ax.plot([s for s, _ in points], [scale * v for _, v in points], marker="" if scale == 1 else "o",
                    label=label, color=colours[label])
            ax.set_title(name)
            ax.set_xlabel("step")
    axes[0].set_yscale("log")  # KD's total carries fd's 2000x weight: one scale for both curves
    teacher = rows["teacher"]
    width = 0.27
    for i, label in enumerate(("teacher", "KD", "baseline")):
        values = [100 * rows[label][k] / teacher[k] if teacher[k] else 0 for k in METRICS]
        axes[3].bar([j + (i - 1) * width for j in range(len(METRICS))], values, width, label=label,
                    color=colours[label])
    axes[3].set_xticks(range(len(METRICS)), list(METRICS.values()))
    axes[3].axhline(90, color="k", lw=0.8, ls="--")
    axes[3].set_title("retention (% of the teacher)")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def describe(arch: str) -> str:
    import open_clip

    cfg = open_clip.get_model_config(arch)
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    image = v.get("timm_model_name") or f"ViT {v['layers']}x{v['width']}"
    return f"{image} image tower, text {t['layers']}x{t['width']}, embed {cfg['embed_dim']}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo")
    p.add_argument("--seed", type=int, default=Budget.seed, help="seed of the world, the teacher and the students")
    p.add_argument("--num-train", type=int, default=Budget.num_train, help="the teacher's training pairs")
    p.add_argument("--num-distill", type=int, default=Budget.num_distill, help="the students' training pairs")
    p.add_argument("--teacher-epochs", type=int, default=Budget.teacher_epochs)
    p.add_argument("--student-epochs", type=int, default=Budget.student_epochs)
    p.add_argument("--teacher-lr", type=float, default=Budget.teacher_lr)
    p.add_argument("--student-lr", type=float, default=Budget.student_lr, help="both students' --lr")
    p.add_argument("--eval-every", type=int, default=Budget.eval_every, help="students: evaluate every N epochs")
    p.add_argument("--threads", type=int, default=Budget.threads)
    opts = p.parse_args()
    torch.set_num_threads(opts.threads)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights" notes: we load our own
    t0 = time.time()
    budget = Budget(opts.seed, opts.num_train, opts.num_distill, opts.teacher_epochs, opts.student_epochs,
                    opts.teacher_lr, opts.student_lr, opts.eval_every, opts.threads)
    world, teacher_file, _ = prepare_teacher(opts.out, opts.threads, budget)

    print(f"[3/5] the students ({STUDENT}) on the {world.num_distill}-pair distillation set, {budget.student_epochs} "
          f"epochs each: CLIP-KD recipe, then the no-KD baseline", flush=True)
    ckpts = train_students(opts.out, world, teacher_file, budget, opts.seed)

    print("[4/5] evaluating", flush=True)
    start = time.time()
    rows = {"teacher": evaluate(TEACHER, teacher_file, world), "KD": evaluate(STUDENT, ckpts["kd"], world),
            "baseline": evaluate(STUDENT, ckpts["baseline"], world)}
    TIMES["evaluation"] = time.time() - start
    names = {"teacher": f"teacher ({TEACHER})", "KD": f"student, CLIP-KD ({STUDENT})",
             "baseline": f"student, no KD ({STUDENT})"}
    took = {"teacher": TIMES.get("teacher"), "KD": TIMES.get("kd"), "baseline": TIMES.get("baseline")}
    teacher = rows["teacher"]
    print("\n| model | zero-shot top-1 | I→T R@1 | T→I R@1 | retention: zero-shot / I→T / T→I | trained in |")
    print("|---|---:|---:|---:|---:|---:|")
    for key, m in rows.items():
        retention = " / ".join(f"{100 * m[k] / teacher[k]:.0f}%" if teacher[k] else "n/a" for k in METRICS)
        seconds = f"{took[key]:.0f}s" if took[key] is not None else "reused"
        print(f"| {names[key]} | {100 * m[ZS]:.1f} | {100 * m[I2T]:.1f} | {100 * m[T2I]:.1f} | {retention} | "
              f"{seconds} |")
    print(f"| chance | {100 * world.chance:.1f} | {100 / world.num_val:.1f} | {100 / world.num_val:.1f} | | |")
    margin = {k: rows["KD"][k] - rows["baseline"][k] for k in METRICS}
    base = rows["baseline"][I2T]  # the ratio is undefined when the baseline retrieves nothing
    ratio = f"{rows['KD'][I2T] / base:.2f}×" if base else "baseline at 0"
    print(f"\nKD − baseline: zero-shot {100 * margin[ZS]:+.1f} pp, I→T R@1 {100 * margin[I2T]:+.1f} pp "
          f"({ratio}), T→I R@1 {100 * margin[T2I]:+.1f} pp (seed {opts.seed}; the spread over seeds: "
          f"python benchmarks/methods.py --seeds 0,1,2 --only clip-kd)")
    print(f"models: teacher {describe(TEACHER)}; students {describe(STUDENT)}")

    print("[5/5] writing the report", flush=True)
    report = os.path.join(opts.out, "report.png")
    runs = {"KD": os.path.join(opts.out, "runs", "kd"), "baseline": os.path.join(opts.out, "runs", "baseline")}
    write_report(report, runs, rows, f"{TEACHER} → {STUDENT}, {budget.student_epochs} epochs of "
                 f"{world.num_distill} pairs, seed {opts.seed}")
    print(f"\nquickstart finished in {time.time() - t0:.0f}s; {report}; runs, logs and checkpoints in {opts.out}/; "
          f"TensorBoard: tensorboard --logdir {os.path.join(opts.out, 'runs')}")


if __name__ == "__main__":
    main()

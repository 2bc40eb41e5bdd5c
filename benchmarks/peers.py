"""Peer benchmark: the same KD step through open_clip_train's own --distill and through this trainer.

    python benchmarks/peers.py                                   # ViT-B-32 -> ViT-S-32, batch 8, CPU, fp32
    python benchmarks/peers.py --precision amp_bf16 --rounds 3 --steps 8
    python benchmarks/peers.py --device cuda --precision amp_bf16 --batch-size 256 --teacher-compile

Runs of the same pair, batch, precision, thread count and synthetic data, interleaved over --rounds rounds
(so machine noise hits all of them alike), each a separate process started through its real command line:
  open_clip_train  python -m open_clip_train.main --distill-model T --distill-pretrained FILE --dataset-type synthetic
                   (its DistillClipLoss: CLIP loss + soft-target cross-entropy to the teacher's logits)
  ours online      python -m training.main --recipe open_clip (task=1,crd=1 with the soft-target CE: the same loss)
                   --dataset-type synthetic, the live frozen teacher
  ours cached      the same with --teacher-cache DIR (a teacher-embedding cache built once by
                   python -m training.cache_teacher over a CSV of noise images; no teacher runs)
  student alone    open_clip_train without --distill: the student's own CLIP step, the floor of any cached KD
                   step (so open_clip_train online / student alone bounds what a cache can gain; --no-floor skips it)

Step time comes from each tool's own per-step log line, never from process wall time: open_clip_train's
"Data (t) / Batch (t)" and our "data_time / batch_time" (both with --log-every-n-steps 1: the time of that one step,
from the end of the previous step). A step is batch_time - data_time (the loader is not what is compared; the cached
run reads a CSV where the others draw synthetic tensors), and the first --skip steps of every run (allocation,
compile) are dropped. Reported: the median step of each tool, and the ratios ours online / open_clip_train and
open_clip_train / ours cached, per round and over all rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "src")
OPEN_CLIP_STEP = re.compile(r"Train Epoch: .*?Data \(t\): ([0-9.]+) Batch \(t\): ([0-9.]+)")
OUR_STEP = re.compile(r"train step \d+ \|.*?data_time: ([0-9.e+-]+) batch_time: ([0-9.e+-]+)")


def run_steps(cmd: list[str], pattern: re.Pattern, env: dict, skip: int) -> list[float]:
    """Run one training process; its logged per-step compute times (batch - data), the first `skip` dropped."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{log[-3000:]}")
    steps = [float(b) - float(d) for d, b in pattern.findall(log)]
    if len(steps) <= skip:
        raise SystemExit(f"only {len(steps)} step lines logged by: {' '.join(cmd)}\n{log[-3000:]}")
    return steps[skip:]


def common_env(opts) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads), MKL_NUM_THREADS=str(opts.threads),
               HF_HUB_OFFLINE="1", PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if opts.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def open_clip_model(name: str, folder: str) -> str:
    """The --model open_clip_train is given: the name, or for an architecture open_clip does not ship (ViT-T-16,
    this project's configs) a `local-dir:` folder holding its config (random weights, as in every run here)."""
    import open_clip

    if name in open_clip.list_models():
        return name
    sys.path.insert(0, SRC)
    import training  # noqa: F401  (registers this project's model configs with open_clip)

    config = open_clip.get_model_config(name)
    if config is None:
        raise SystemExit(f"unknown model {name!r}: neither open_clip nor this project has its config")
    local = os.path.join(folder, "open_clip_models", name)
    os.makedirs(local, exist_ok=True)
    with open(os.path.join(local, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": config}, f)
    return f"local-dir:{local}"


def open_clip_cmd(opts, folder: str, model: str, weights: str | None, name: str) -> list[str]:
    """open_clip_train training `model` (open_clip_model's answer) with the teacher in `weights` distilled into it;
    without weights, the student's CLIP step alone."""
    distill = ["--distill-model", opts.teacher, "--distill-pretrained", weights] if weights else []
    return [sys.executable, "-m", "open_clip_train.main", "--model", model, *distill,
            "--dataset-type", "synthetic", "--train-num-samples",
            str(opts.batch_size * opts.steps), "--batch-size", str(opts.batch_size), "--epochs", "1", "--workers",
            "0", "--lr", "1e-4", "--warmup", "1", "--precision", opts.precision, "--device", opts.device,
            "--log-every-n-steps", "1", "--save-frequency", "0", "--zeroshot-frequency", "0", "--val-frequency", "0",
            "--report-to", "", "--logs", os.path.join(folder, "open_clip_logs"), "--name", name]


def our_cmd(opts, folder: str, weights: str, name: str, cache: str | None = None, csv: str | None = None
            ) -> list[str]:
    data = (["--train-data", csv, "--data-root", os.path.dirname(csv), "--teacher-cache", cache] if cache else
            ["--dataset-type", "synthetic", "--synthetic-num-samples", str(opts.batch_size * opts.steps)])
    cmd = [sys.executable, "-m", "training.main", "--model", opts.student, "--teacher", opts.teacher,
           "--teacher-pretrained", weights, *data, "--recipe", "open_clip", "--batch-size", str(opts.batch_size),
           "--epochs", "1", "--workers", "0", "--lr", "1e-4", "--warmup", "1", "--precision", opts.precision,
           "--device", opts.device, "--log-every-n-steps", "1", "--save-frequency", "0", "--zeroshot-frequency", "0",
           "--val-frequency", "0", "--logs", os.path.join(folder, "our_logs"), "--name", name]
    if opts.teacher_compile and not cache:
        cmd.append("--teacher-compile")
    return cmd


def build_cache(opts, folder: str, weights: str, env: dict) -> tuple[str, str]:
    sys.path.insert(0, HERE)
    from step_time import write_batch_csv

    csv = write_batch_csv(os.path.join(folder, "data"), opts.batch_size * opts.steps, opts.image_size)
    cache = os.path.join(folder, "cache")
    cmd = [sys.executable, "-m", "training.cache_teacher", "--teacher", opts.teacher, "--teacher-pretrained",
           weights, "--train-data", csv, "--data-root", os.path.dirname(csv), "--out", cache, "--batch-size",
           str(opts.batch_size), "--workers", "0", "--device", opts.device, "--precision", opts.precision]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"building the cache failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return csv, cache


def save_teacher(opts, folder: str) -> str:
    """Random (seeded) teacher weights in a file: open_clip_train distils only from --distill-pretrained."""
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model(opts.teacher, pretrained=None)
    path = os.path.join(folder, "teacher.pt")
    torch.save(model.state_dict(), path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="ViT-B-32")
    p.add_argument("--student", default="ViT-S-32")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="logged steps per run (before --skip)")
    p.add_argument("--skip", type=int, default=2, help="first steps of each run dropped (start-up)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--image-size", type=int, default=224, help="the CSV images of the cached run")
    p.add_argument("--teacher-compile", action="store_true", help="our online run with --teacher-compile")
    p.add_argument("--no-cache", action="store_true", help="skip the cached run")
    p.add_argument("--no-floor", action="store_true", help="skip open_clip_train's student-alone run")
    opts = p.parse_args()

    env = common_env(opts)
    with tempfile.TemporaryDirectory(prefix="peers-") as folder:
        weights = save_teacher(opts, folder)
        student = open_clip_model(opts.student, folder)
        cached = None if opts.no_cache else build_cache(opts, folder, weights, env)
        runs = {"open_clip_train": lambda r: run_steps(open_clip_cmd(opts, folder, student, weights, f"oc{r}"),
                                                       OPEN_CLIP_STEP, env, opts.skip),
                "ours online": lambda r: run_steps(our_cmd(opts, folder, weights, f"on{r}"), OUR_STEP, env,
                                                   opts.skip)}
        if cached:
            runs["ours cached"] = lambda r: run_steps(our_cmd(opts, folder, weights, f"ca{r}", cached[1],
                                                              cached[0]), OUR_STEP, env, opts.skip)
        if not opts.no_floor:
            runs["student alone"] = lambda r: run_steps(open_clip_cmd(opts, folder, student, None, f"st{r}"),
                                                        OPEN_CLIP_STEP, env, opts.skip)
        steps: dict[str, list[float]] = {k: [] for k in runs}
        print(f"{opts.teacher} -> {opts.student}, batch {opts.batch_size}, {opts.precision}, {opts.device}, "
              f"{opts.threads} threads, {opts.rounds} rounds x {opts.steps - opts.skip} timed steps per run; "
              f"load average before: {os.getloadavg()[0]:.2f}")
        for r in range(opts.rounds):
            medians = {}
            for name, run in runs.items():
                times = run(r)
                steps[name] += times
                medians[name] = statistics.median(times)
            line = "  ".join(f"{k} {v * 1e3:.0f} ms" for k, v in medians.items())
            ratio = medians["ours online"] / medians["open_clip_train"]
            extra = (f", open_clip_train / ours cached {medians['open_clip_train'] / medians['ours cached']:.2f}x"
                     if cached else "")
            if "student alone" in medians:
                ceiling = medians["open_clip_train"] / medians["student alone"]
                extra += f", open_clip_train / student alone {ceiling:.2f}x (the most a cache could gain)"
            print(f"round {r}: {line}  | ours online / open_clip_train {ratio:.2f}{extra}", flush=True)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        print("\n| run | median step (ms) | vs open_clip_train online |")
        print("|---|---|---|")
        base = statistics.median(steps["open_clip_train"])
        for name, times in steps.items():
            median = statistics.median(times)
            print(f"| {name} | {median * 1e3:.0f} | {median / base:.2f}x step time ({base / median:.2f}x speed) |")


if __name__ == "__main__":
    main()

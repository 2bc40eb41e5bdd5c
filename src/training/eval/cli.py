"""Evaluation suite: zero-shot classification, image-text retrieval, linear probes, teacher-vs-student retention.

Command line (one process, or data-parallel under torchrun / srun; every rank gets the 1-process numbers)::

    python -m training.eval --model ViT-T-16 --pretrained logs/run/checkpoints/epoch_32.pt \
        --teacher ViT-B-16 --teacher-pretrained openai \
        --tasks zeroshot,retrieval,linear_probe \
        --datasets imagenet1k=/data/imagenet/val,imagenetv2=/data/imagenetv2-matched-frequency-format-val,\
cifar10=/data/cifar,coco=/data/coco/dataset_coco.json --data-root /data/coco --output eval/run

writes one CLIP_benchmark JSON per (model, dataset, task) under OUTPUT/student/ and OUTPUT/teacher/, a
`summary.json`, and with a teacher `retention.md` + `retention.png`.

Evaluation during training is `training.eval.hook.TrainingEvaluator`.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from ..distributed import init_distributed
from ..errors import UsageError, run_cli
from ..fileio import write_json
from ..params import Parser, add_csv_flags, add_loader_flags
from .datasets import parse_dataset_specs
from .linear_probe import DEFAULT_WD_GRID
from .report import write_report
from .results import TASKS, flat_metrics
from .suite import EvalOptions, evaluate_model, plan_jobs, rank0_log


def add_model_flags(p: argparse.ArgumentParser) -> None:
    # not training.params' student/teacher groups: here --model is required, --teacher is one model (no ensemble)
    # and an unset --teacher-pretrained is '' (random init), and the lock/compile flags mean nothing
    g = p.add_argument_group('models', 'the student and, for the retention report, its teacher')
    g.add_argument("--model", required=True, help="open_clip model name or JSON config path")
    g.add_argument("--pretrained", default="",
                   help="weights: open_clip tag, weights file, or training checkpoint (key 'model'); '' = random init")
    g.add_argument("--teacher", default=None, help="teacher model (enables the retention report)")
    g.add_argument("--teacher-pretrained", default="", help="teacher weights (tag or file)")
    g.add_argument("--model-id", default=None, help="cache id of the student (default: from arch + checkpoint)")
    g.add_argument("--teacher-model-id", default=None, help="cache id of the teacher")


def add_suite_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('suite', 'the tasks, the sets and where results go')
    g.add_argument("--tasks", default="zeroshot,retrieval", help="comma list of: " + ", ".join(TASKS))
    g.add_argument("--datasets", required=True,
                   help="comma list of NAME=PATH (NAME: imagenet1k, imagenetv2, imagenet-r, imagenet-a, "
                        "imagenet-sketch, cifar10, cifar100, stl10, pets, pets-coarse, folder, wds, coco, flickr30k, "
                        "csv, or any label with the format detected from PATH) or bare PATHs (detected); a retrieval "
                        "file may name its image root: coco=JSON::ROOT")
    g.add_argument("--output", default="eval_results", help="result folder")
    g.add_argument("--max-captions", type=int, default=5, help="captions per image kept from Karpathy JSON")
    g.add_argument("--templates", default="auto",
                   help="auto (each dataset's own prompts), openai (80 ImageNet prompts), simple, or a file")
    g.add_argument("--imagenet-wnids", default=None,
                   help="file of the 1000 ImageNet wnids in class order (default: the list shipped here)")
    g.add_argument("--skip-existing", action="store_true",
                   help="reuse result files already in OUTPUT for the same model and weights")


def add_linear_probe_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('linear probe')
    g.add_argument("--feature-cache", default=None,
                   help="linear-probe feature cache folder (default OUTPUT/feature_cache; '' disables)")
    g.add_argument("--lp-wd-grid", default=",".join(f"{w:g}" for w in DEFAULT_WD_GRID),
                   help="linear-probe weight decays swept on a held-out split of train")
    g.add_argument("--lp-val-fraction", type=float, default=0.2)
    g.add_argument("--lp-max-iter", type=int, default=1000, help="L-BFGS iterations per fit")


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    # not training.params' runtime group: evaluation's precision is autocast on CUDA only (bf16 included), so
    # --amp-fp16-on-cpu means nothing here, and the process group comes from the launcher's environment
    g = p.add_argument_group('runtime')
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--precision", default="amp", choices=["fp32", "amp", "amp_bf16", "bf16"],
                   help="autocast on CUDA (CPU always runs fp32)")
    g.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m training.eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
               description="Zero-shot, retrieval and linear-probe evaluation of a (student) CLIP, optionally "
                           "against its teacher (retention = student / teacher).")
    for add in (add_model_flags, add_suite_flags, add_csv_flags, add_loader_flags, add_linear_probe_flags,
                add_runtime_flags):
        add(p)
    return p


def options(args: argparse.Namespace) -> EvalOptions:
    """The suite's settings from the parsed flags; raises UsageError."""
    tasks = tuple(t.strip().replace("-", "_") for t in args.tasks.split(",") if t.strip())
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise UsageError(f"unknown task '{bad[0] if bad else args.tasks}' (known: {', '.join(TASKS)})")
    try:
        grid = tuple(float(w) for w in args.lp_wd_grid.split(",") if w.strip())
    except ValueError as exc:
        raise UsageError(f"--lp-wd-grid: {exc}") from exc
    wnids = None
    if args.imagenet_wnids:
        if not os.path.isfile(args.imagenet_wnids):
            raise UsageError(f"--imagenet-wnids: file not found: {args.imagenet_wnids}")
        with open(args.imagenet_wnids) as f:
            wnids = tuple(w.split()[0] for w in f if w.strip())
    cache = os.path.join(args.output, "feature_cache") if args.feature_cache is None else (args.feature_cache or None)
    return EvalOptions(tasks=tasks, batch_size=args.batch_size, workers=args.workers, precision=args.precision,
                       templates=args.templates, data_root=args.data_root, csv_img_key=args.csv_img_key,
                       csv_caption_key=args.csv_caption_key, csv_separator=args.csv_separator,
                       max_captions=args.max_captions, wnids=wnids, cache_dir=cache, wd_grid=grid or DEFAULT_WD_GRID,
                       lp_val_fraction=args.lp_val_fraction, lp_max_iter=args.lp_max_iter, seed=args.seed)


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    opts = options(args)
    specs = parse_dataset_specs(args.datasets)
    if not specs:
        raise UsageError("--datasets is empty")
    jobs = plan_jobs(specs, opts, rank0_log())
    if not jobs:
        raise UsageError(f"nothing to do: no dataset in --datasets fits --tasks {args.tasks}")
    try:
        env = init_distributed(args.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    log = rank0_log()
    torch.manual_seed(args.seed)
    summary: dict = {}
    student, s_params = evaluate_model(args.model, args.pretrained, jobs, opts, env.device,
                                       os.path.join(args.output, "student"), args.model_id, args.skip_existing)
    summary["student"] = {"model": args.model, "pretrained": args.pretrained, "parameters_m": s_params,
                          "metrics": {k: v for r in student for k, v in flat_metrics(r).items()}}
    if args.teacher:
        teacher, t_params = evaluate_model(args.teacher, args.teacher_pretrained, jobs, opts, env.device,
                                           os.path.join(args.output, "teacher"), args.teacher_model_id,
                                           args.skip_existing)
        summary["teacher"] = {"model": args.teacher, "pretrained": args.teacher_pretrained, "parameters_m": t_params,
                              "metrics": {k: v for r in teacher for k, v in flat_metrics(r).items()}}
        sm, tm = summary["student"]["metrics"], summary["teacher"]["metrics"]
        summary["retention_percent"] = {k: 100 * sm[k] / tm[k] for k in sm if k in tm and tm[k]}
    if env.is_master:
        write_json(os.path.join(args.output, "summary.json"), summary, indent=2)
        if args.teacher:
            paths = write_report(args.output, student, teacher, f"{args.model} {args.pretrained}".strip(),
                                 f"{args.teacher} {args.teacher_pretrained}".strip(), (t_params, s_params))
            with open(paths["markdown"]) as f:
                print(f.read(), flush=True)
            log(f"wrote {paths['markdown']} and {paths['chart']}")
        else:
            for k, v in summary["student"]["metrics"].items():
                log(f"{k}: {100 * v:.2f}")
        log(f"results in {args.output}")
    return 0


def main(argv=None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())

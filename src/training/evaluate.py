"""Evaluation suite: zero-shot classification, image-text retrieval, linear probes, teacher-vs-student retention.

Command line (one process, or data-parallel under torchrun / srun; every rank gets the 1-process numbers)::

    python -m training.evaluate --model ViT-T-16 --pretrained logs/run/checkpoints/epoch_32.pt \
        --teacher ViT-B-16 --teacher-pretrained openai \
        --tasks zeroshot,retrieval,linear_probe \
        --datasets imagenet1k=/data/imagenet/val,imagenetv2=/data/imagenetv2-matched-frequency-format-val,\
cifar10=/data/cifar,coco=/data/coco/dataset_coco.json --data-root /data/coco --output eval/run

writes one CLIP_benchmark JSON per (model, dataset, task) under OUTPUT/student/ and OUTPUT/teacher/, a
`summary.json`, and with a teacher `retention.md` + `retention.png`.

In training: `evaluate_in_training(model, preprocess_val, tokenizer, args, epoch, device)` (see its docstring).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .distributed import detect_world, init_distributed, world_info
from .eval.datasets import (
    CLASSIFICATION_KINDS,
    ClassificationSet,
    DatasetError,
    DatasetSpec,
    RetrievalSet,
    detect,
    detect_kind,
    has_train_split,
    load_classification,
    load_retrieval,
    parse_dataset_specs,
)
from .eval.linear_probe import DEFAULT_WD_GRID, run_linear_probe
from .eval.loading import load_model, model_id
from .eval.report import write_report
from .eval.results import TASKS, find_record, flat_metrics, make_record, write_record
from .eval.retrieval import run_retrieval
from .eval.zeroshot import run_zeroshot
from .errors import UsageError

ZEROSHOT_KEYS = ("top1", "top5", "mean_per_class_recall")
RETRIEVAL_KEYS = tuple(f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10))


@dataclass
class EvalOptions:
    tasks: tuple[str, ...] = ("zeroshot", "retrieval")
    batch_size: int = 64
    workers: int = 0
    precision: str | None = None
    templates: str = "auto"
    data_root: str | None = None
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str = "\t"
    max_captions: int = 5
    wnids: list[str] | None = None
    cache_dir: str | None = None
    wd_grid: tuple[float, ...] = DEFAULT_WD_GRID
    lp_val_fraction: float = 0.2
    lp_max_iter: int = 1000
    seed: int = 0


@dataclass
class Job:
    task: str
    spec: DatasetSpec
    data: ClassificationSet | RetrievalSet
    train: ClassificationSet | None = None
    metrics: dict = field(default_factory=dict)


def _log_fn() -> Callable[[str], None]:
    rank = world_info()[0] if world_info()[1] > 1 else detect_world()[0]
    return (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)


def plan_jobs(specs: list[DatasetSpec], opts: EvalOptions, log: Callable[[str], None] | None = None) -> list[Job]:
    """Read every dataset description up front (bad input fails before any model is built)."""
    jobs: list[Job] = []
    for spec in specs:
        if spec.detected and log:  # a detected kind is said out loud, so a wrong one is visible
            log(f"{spec.name}: detected {spec.path} as {spec.kind} ({spec.detected}); pass KIND=PATH to choose another")
        if spec.is_retrieval:
            if "retrieval" in opts.tasks:
                jobs.append(Job("retrieval", spec, load_retrieval(
                    spec, opts.data_root, opts.csv_img_key, opts.csv_caption_key, opts.csv_separator,
                    opts.max_captions)))
            elif log:
                log(f"skip {spec.name}: a retrieval set, and task retrieval was not requested")
            continue
        test = None
        if "zeroshot" in opts.tasks:
            test = load_classification(spec, "test", opts.templates, opts.wnids)
            jobs.append(Job("zeroshot", spec, test))
        if "linear_probe" in opts.tasks:
            if has_train_split(spec):
                test = test or load_classification(spec, "test", opts.templates, opts.wnids)
                jobs.append(Job("linear_probe", spec, test, load_classification(spec, "train", opts.templates,
                                                                                opts.wnids)))
            elif log:
                log(f"skip linear probe on {spec.name}: no train split at {spec.path}")
        if "zeroshot" not in opts.tasks and "linear_probe" not in opts.tasks and log:
            log(f"skip {spec.name}: a classification set, and neither zeroshot nor linear_probe was requested")
    if log:
        said = set()
        for job in jobs:
            for ds in (job.data, job.train):
                for note in getattr(ds, "notes", None) or []:
                    if note not in said:
                        said.add(note)
                        log(f"note: {job.spec.name}: {note}")
    return jobs


def run_job(job: Job, model, preprocess, tokenizer, device: torch.device, opts: EvalOptions, mid: str,
            log: Callable[[str], None] | None = None) -> dict[str, float]:
    common = dict(batch_size=opts.batch_size, workers=opts.workers, precision=opts.precision, log=log)
    if job.task == "zeroshot":
        return run_zeroshot(model, tokenizer, job.data, preprocess, device, **common)
    if job.task == "retrieval":
        return run_retrieval(model, tokenizer, job.data, preprocess, device, **common)
    return run_linear_probe(model, job.train, job.data, preprocess, device, model_id=mid, cache_dir=opts.cache_dir,
                            wd_grid=opts.wd_grid, val_fraction=opts.lp_val_fraction, max_iter=opts.lp_max_iter,
                            seed=opts.seed, **common)


def _details(job: Job) -> dict:
    d = {"kind": job.spec.kind, "path": os.path.abspath(job.spec.path)}
    if job.spec.detected:
        d["detected"] = job.spec.detected
    if isinstance(job.data, ClassificationSet):
        d.update(num_classes=job.data.num_classes, num_templates=len(job.data.templates))
        if job.data.notes:  # the result file keeps why its number may not be the benchmark's
            d["notes"] = list(job.data.notes)
    return d


# ---- in training ------------------------------------------------------------------------------------------------

_SETS: dict[tuple, object] = {}


def _cached(key: tuple, build: Callable[[], object]):
    if key not in _SETS:
        _SETS[key] = build()
    return _SETS[key]


def _due(epoch: int, frequency: int | None, total_epochs: int | None) -> bool:
    if not frequency or frequency <= 0:
        return False
    return epoch % frequency == 0 or (total_epochs is not None and epoch == total_epochs)


def _in_training_specs(args) -> tuple[DatasetSpec | None, DatasetSpec | None, list[DatasetSpec]]:
    zs = val = None
    if getattr(args, "zeroshot_data", None):
        try:
            kind, why = detect(args.zeroshot_data)
        except DatasetError:
            if not os.path.isdir(args.zeroshot_data):
                raise
            # --zeroshot-data is an image folder by definition; _load_folder refuses folders without class names
            kind, why = "folder", "an image folder, as --zeroshot-data expects"
        if kind not in CLASSIFICATION_KINDS:
            raise UsageError(f"--zeroshot-data {args.zeroshot_data} is not a classification set ({kind})")
        zs = DatasetSpec("zeroshot", kind, args.zeroshot_data, detected=why)
    if getattr(args, "val_data", None):
        kind = detect_kind(args.val_data) or "csv"
        if kind in CLASSIFICATION_KINDS:
            raise UsageError(f"--val-data {args.val_data} is not a retrieval set (CSV or Karpathy JSON)")
        val = DatasetSpec("val", kind, args.val_data)
    suite = parse_dataset_specs(getattr(args, "eval_datasets", None))
    return zs, val, suite


def validate_eval_args(args) -> None:
    """Check --zeroshot-data, --val-data and --eval-datasets up front; raises UsageError (call on every rank)."""
    try:
        for path, flag in ((getattr(args, "zeroshot_data", None), "--zeroshot-data"),
                           (getattr(args, "val_data", None), "--val-data")):
            if path and not os.path.exists(path):
                raise UsageError(f"{flag}: path not found: {path}")
        zs, val, suite = _in_training_specs(args)
        opts = _training_opts(args)
        sets = []
        if zs:
            sets.append((zs, _cached(("cls", zs.kind, zs.path), lambda: load_classification(zs, "test"))))
        if val:
            _cached(("ret", val.kind, val.path, opts.data_root), lambda: load_retrieval(
                val, opts.data_root, opts.csv_img_key, opts.csv_caption_key, opts.csv_separator))
        for spec in suite:
            if spec.is_retrieval:
                load_retrieval(spec, opts.data_root, opts.csv_img_key, opts.csv_caption_key, opts.csv_separator)
            else:
                sets.append((spec, load_classification(spec, "test")))
        # said once at start-up: which kind each set was taken for, and what makes its number not the benchmark's
        for spec, ds in sets:
            if spec.detected:
                logging.info("eval set %s: detected %s as %s (%s)", spec.name, spec.path, spec.kind, spec.detected)
            for note in ds.notes:
                logging.warning("eval set %s: %s", spec.name, note)
    except DatasetError as exc:
        raise UsageError(str(exc)) from exc


def _training_opts(args) -> EvalOptions:
    data_root = getattr(args, "data_root", None)
    if data_root and "," in data_root:
        data_root = data_root.split(",")[0]
    return EvalOptions(batch_size=getattr(args, "batch_size", 64), workers=getattr(args, "workers", 0),
                       precision=getattr(args, "precision", None), data_root=data_root,
                       csv_img_key=getattr(args, "csv_img_key", "filepath"),
                       csv_caption_key=getattr(args, "csv_caption_key", "title"),
                       csv_separator=getattr(args, "csv_separator", "\t"))


def evaluate_in_training(model, preprocess_val, tokenizer, args, epoch: int, device) -> dict[str, float]:
    """Evaluation during training; collective: every rank calls it, every rank gets the same dict.

    `epoch` counts completed epochs (1 after the first; 0 = before training). Runs
    - zero-shot on `args.zeroshot_data` when epoch % args.zeroshot_frequency == 0 (or at the last epoch):
      `zeroshot/top1`, `zeroshot/top5`, `zeroshot/mean_per_class_recall`;
    - retrieval on `args.val_data` (CSV read with args.data_root / csv_img_key / csv_caption_key / csv_separator,
      or a Karpathy JSON) when epoch % args.val_frequency == 0: `retrieval/image_to_text_R@1` ... `@10`,
      `retrieval/text_to_image_R@1` ... `@10`;
    - every `--eval-datasets` set when epoch % args.eval_frequency == 0: `zeroshot/<name>/top1`, ...
      (classification sets) or `retrieval/<name>/image_to_text_R@1`, ... (retrieval sets).
    Values are fractions in [0, 1]. `model` is the unwrapped open_clip model; it is put back in its training mode.
    """
    device = torch.device(device)
    total = getattr(args, "epochs", None)
    try:
        zs, val, suite = _in_training_specs(args)
    except DatasetError as exc:
        raise UsageError(str(exc)) from exc
    opts = _training_opts(args)
    common = dict(batch_size=opts.batch_size, workers=opts.workers, precision=opts.precision)
    out: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        if zs and _due(epoch, getattr(args, "zeroshot_frequency", 1), total):
            ds = _cached(("cls", zs.kind, zs.path), lambda: load_classification(zs, "test"))
            m = run_zeroshot(model, tokenizer, ds, preprocess_val, device, **common)
            out.update({f"zeroshot/{k}": m[k] for k in ZEROSHOT_KEYS})
        if val and _due(epoch, getattr(args, "val_frequency", 1), total):
            ds = _cached(("ret", val.kind, val.path, opts.data_root), lambda: load_retrieval(
                val, opts.data_root, opts.csv_img_key, opts.csv_caption_key, opts.csv_separator))
            m = run_retrieval(model, tokenizer, ds, preprocess_val, device, **common)
            out.update({f"retrieval/{k}": m[k] for k in RETRIEVAL_KEYS})
        if suite and _due(epoch, getattr(args, "eval_frequency", 1), total):
            for spec in suite:
                if spec.is_retrieval:
                    ds = _cached(("ret", spec.kind, spec.path, opts.data_root), lambda s=spec: load_retrieval(
                        s, opts.data_root, opts.csv_img_key, opts.csv_caption_key, opts.csv_separator))
                    m = run_retrieval(model, tokenizer, ds, preprocess_val, device, **common)
                    out.update({f"retrieval/{spec.name}/{k}": m[k] for k in RETRIEVAL_KEYS})
                else:
                    ds = _cached(("cls", spec.kind, spec.path), lambda s=spec: load_classification(s, "test"))
                    m = run_zeroshot(model, tokenizer, ds, preprocess_val, device, **common)
                    out.update({f"zeroshot/{spec.name}/{k}": m[k] for k in ZEROSHOT_KEYS})
    except DatasetError as exc:
        raise UsageError(str(exc)) from exc
    finally:
        model.train(was_training)
    return out


# ---- command line -----------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (raised so main() prints it)
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m training.evaluate", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                description="Zero-shot, retrieval and linear-probe evaluation of a (student) CLIP, optionally "
                            "against its teacher (retention = student / teacher).")
    p.add_argument("--model", required=True, help="open_clip model name or JSON config path")
    p.add_argument("--pretrained", default="",
                   help="weights: open_clip tag, weights file, or training checkpoint (key 'model'); '' = random init")
    p.add_argument("--teacher", default=None, help="teacher model (enables the retention report)")
    p.add_argument("--teacher-pretrained", default="", help="teacher weights (tag or file)")
    p.add_argument("--tasks", default="zeroshot,retrieval", help="comma list of: " + ", ".join(TASKS))
    p.add_argument("--datasets", required=True,
                   help="comma list of NAME=PATH (NAME: imagenet1k, imagenetv2, imagenet-r, imagenet-a, "
                        "imagenet-sketch, cifar10, cifar100, stl10, pets, pets-coarse, folder, wds, coco, flickr30k, "
                        "csv, or any label with the format detected from PATH) or bare PATHs (detected); a retrieval file may "
                        "name its image root: coco=JSON::ROOT")
    p.add_argument("--output", default="eval_results", help="result folder")
    p.add_argument("--data-root", default=None,
                   help="image root for CSV rows and Karpathy JSON files (default: the file's folder)")
    p.add_argument("--csv-img-key", default="filepath")
    p.add_argument("--csv-caption-key", default="title")
    p.add_argument("--csv-separator", default="\t")
    p.add_argument("--max-captions", type=int, default=5, help="captions per image kept from Karpathy JSON")
    p.add_argument("--templates", default="auto",
                   help="auto (each dataset's own prompts), openai (80 ImageNet prompts), simple, or a file")
    p.add_argument("--imagenet-wnids", default=None,
                   help="file of the 1000 ImageNet wnids in class order (default: the list shipped here)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="amp", choices=["fp32", "amp", "amp_bf16", "bf16"],
                   help="autocast on CUDA (CPU always runs fp32)")
    p.add_argument("--feature-cache", default=None,
                   help="linear-probe feature cache folder (default OUTPUT/feature_cache; '' disables)")
    p.add_argument("--model-id", default=None, help="cache id of the student (default: from arch + checkpoint)")
    p.add_argument("--teacher-model-id", default=None, help="cache id of the teacher")
    p.add_argument("--lp-wd-grid", default=",".join(f"{w:g}" for w in DEFAULT_WD_GRID),
                   help="linear-probe weight decays swept on a held-out split of train")
    p.add_argument("--lp-val-fraction", type=float, default=0.2)
    p.add_argument("--lp-max-iter", type=int, default=1000, help="L-BFGS iterations per fit")
    p.add_argument("--skip-existing", action="store_true",
                   help="reuse result files already in OUTPUT for the same model and weights")
    p.add_argument("--seed", type=int, default=0)
    return p


def _options(args) -> EvalOptions:
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
            wnids = [w.split()[0] for w in f if w.strip()]
    cache = os.path.join(args.output, "feature_cache") if args.feature_cache is None else (args.feature_cache or None)
    return EvalOptions(tasks=tasks, batch_size=args.batch_size, workers=args.workers, precision=args.precision,
                       templates=args.templates, data_root=args.data_root, csv_img_key=args.csv_img_key,
                       csv_caption_key=args.csv_caption_key, csv_separator=args.csv_separator,
                       max_captions=args.max_captions, wnids=wnids, cache_dir=cache, wd_grid=grid or DEFAULT_WD_GRID,
                       lp_val_fraction=args.lp_val_fraction, lp_max_iter=args.lp_max_iter, seed=args.seed)


def evaluate_model(arch: str, pretrained: str, jobs: list[Job], opts: EvalOptions, device: torch.device,
                   out_dir: str, mid: str | None = None, skip_existing: bool = False) -> tuple[list[dict], float]:
    """Run every job for one model; write its result JSONs (rank 0). Returns (records, parameters in millions)."""
    log = _log_fn()
    rank, _ = world_info()
    model, preprocess, tokenizer, name = load_model(arch, pretrained, device)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    mid = mid or model_id(name, pretrained)
    log(f"== {name} ({pretrained or 'random init'}): {params_m:.1f}M parameters")
    records = []
    for job in jobs:
        rec = find_record(out_dir, job.task, job.spec.name, name, pretrained) if skip_existing else None
        if rec is not None:
            log(f"{job.task} {job.spec.name}: reusing {out_dir}")
        else:
            t0 = time.time()
            metrics = run_job(job, model, preprocess, tokenizer, device, opts, mid, log)
            rec = make_record(job.task, job.spec.name, name, pretrained, metrics, seconds=round(time.time() - t0, 2),
                              **_details(job))
            if rank == 0:
                write_record(out_dir, rec)
        records.append(rec)
    del model
    return records, params_m


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    opts = _options(args)
    try:
        specs = parse_dataset_specs(args.datasets)
        if not specs:
            raise UsageError("--datasets is empty")
        log = _log_fn()
        jobs = plan_jobs(specs, opts, log)
    except DatasetError as exc:
        raise UsageError(str(exc)) from exc
    if not jobs:
        raise UsageError(f"nothing to do: no dataset in --datasets fits --tasks {args.tasks}")
    try:
        env = init_distributed(args.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    log = _log_fn()
    if env.device.type != "cuda":
        opts.precision = "fp32"
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
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
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
    try:
        return run(argv)
    except (UsageError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The evaluation suite of one command-line run: jobs planned from the dataset specs, run for one model, written
as result records. The flags that fill `EvalOptions` are `training.eval.cli`'s."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..distributed import detect_world, world_info
from ..errors import UsageError
from .datasets import ClassificationSet, DatasetSpec, RetrievalSet, has_train_split, load_classification, load_retrieval
from .linear_probe import DEFAULT_WD_GRID, run_linear_probe
from .loading import load_model, model_id
from .results import find_record, make_record, write_record
from .retrieval import run_retrieval
from .zeroshot import run_zeroshot


@dataclass(frozen=True)
class EvalOptions:
    """How the suite reads its sets and runs its tasks (the command line's settings)."""

    tasks: tuple[str, ...] = ("zeroshot", "retrieval")
    batch_size: int = 64
    workers: int = 0
    precision: str | None = None  # evaluation is fp32 off CUDA whatever this says (engine.eval_autocast)
    templates: str = "auto"
    data_root: str | None = None
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str = "\t"
    max_captions: int = 5
    wnids: tuple[str, ...] | None = None
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


def rank0_log() -> Callable[[str], None]:
    """print on rank 0 (of the process group, else of the launcher's environment), nothing elsewhere."""
    rank = world_info()[0] if world_info()[1] > 1 else detect_world()[0]
    return (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)


def plan_jobs(specs: list[DatasetSpec], opts: EvalOptions, log: Callable[[str], None] | None = None) -> list[Job]:
    """Read every dataset description up front (bad input fails before any model is built)."""
    wnids = list(opts.wnids) if opts.wnids is not None else None
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
            test = load_classification(spec, "test", opts.templates, wnids)
            jobs.append(Job("zeroshot", spec, test))
        if "linear_probe" in opts.tasks:
            if has_train_split(spec):
                test = test or load_classification(spec, "test", opts.templates, wnids)
                jobs.append(Job("linear_probe", spec, test, load_classification(spec, "train", opts.templates,
                                                                                wnids)))
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
        if tokenizer is None:
            raise UsageError(f"{job.spec.name}: retrieval needs a text tower, which an image-only student does not "
                             "have (drop the retrieval set or task)")
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


def evaluate_model(arch: str, pretrained: str, jobs: list[Job], opts: EvalOptions, device: torch.device,
                   out_dir: str, mid: str | None = None, skip_existing: bool = False) -> tuple[list[dict], float]:
    """Run every job for one model; write its result JSONs (rank 0). Returns (records, parameters in millions)."""
    log = rank0_log()
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

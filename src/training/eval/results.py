"""Result files in CLIP_benchmark's JSON format, one per (model, dataset, task).

    {"dataset": "cifar10", "model": "ViT-T-16", "pretrained": "logs/run/checkpoints/epoch_32.pt",
     "task": "zeroshot_classification", "metrics": {"acc1": 0.71, "acc5": 0.97, "mean_per_class_recall": 0.71},
     "language": "en", "details": {...}}

Metric keys and values are CLIP_benchmark's (fractions in [0, 1]): zero-shot `acc1`, `acc5`,
`mean_per_class_recall`; retrieval `image_retrieval_recall@k` (text->image) and `text_retrieval_recall@k`
(image->text); linear probe `lp_acc1`, `lp_acc5`, `lp_mean_per_class_recall`. Inside the project the same numbers
use flat names such as `zeroshot/cifar10/top1` and `retrieval/coco/image_to_text_R@1` (`flat_metrics`).
"""

from __future__ import annotations

import json
import os
import re

from ..fileio import write_json

TASKS = ("zeroshot", "retrieval", "linear_probe")
BENCHMARK_TASK = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval",
                  "linear_probe": "linear_probe"}
TASK_FROM_BENCHMARK = {v: k for k, v in BENCHMARK_TASK.items()}

_TO_BENCHMARK = {
    "zeroshot": {"top1": "acc1", "top5": "acc5", "mean_per_class_recall": "mean_per_class_recall"},
    "linear_probe": {"top1": "lp_acc1", "top5": "lp_acc5", "mean_per_class_recall": "lp_mean_per_class_recall"},
    "retrieval": {**{f"image_to_text_R@{k}": f"text_retrieval_recall@{k}" for k in (1, 5, 10)},
                  **{f"text_to_image_R@{k}": f"image_retrieval_recall@{k}" for k in (1, 5, 10)}},
}
_FROM_BENCHMARK = {task: {v: k for k, v in m.items()} for task, m in _TO_BENCHMARK.items()}


def make_record(task: str, dataset: str, model: str, pretrained: str, metrics: dict[str, float],
                **details) -> dict:
    """A CLIP_benchmark result dict from our metric names; numbers that are not metrics go to `details`."""
    names = _TO_BENCHMARK[task]
    bench = {names[k]: float(v) for k, v in metrics.items() if k in names}
    extra = {k: v for k, v in metrics.items() if k not in names}
    return {"dataset": dataset, "model": model, "pretrained": pretrained, "task": BENCHMARK_TASK[task],
            "metrics": bench, "language": "en", "details": {**extra, **details}}


def our_metrics(record: dict) -> dict[str, float]:
    """Metrics of a record under our names (top1, image_to_text_R@1, ...)."""
    task = TASK_FROM_BENCHMARK.get(record["task"], record["task"])
    names = _FROM_BENCHMARK.get(task, {})
    return {names.get(k, k): float(v) for k, v in record["metrics"].items()}


def flat_metrics(record: dict) -> dict[str, float]:
    task = TASK_FROM_BENCHMARK.get(record["task"], record["task"])
    return {f"{task}/{record['dataset']}/{k}": v for k, v in our_metrics(record).items()}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def result_path(out_dir: str, record: dict) -> str:
    return os.path.join(out_dir, f"{_slug(record['dataset'])}__{record['task']}.json")


def write_record(out_dir: str, record: dict) -> str:
    path = result_path(out_dir, record)
    write_json(path, record, indent=2)
    return path


def read_records(out_dir: str) -> list[dict]:
    """Every result JSON in `out_dir` (sorted by file name)."""
    if not os.path.isdir(out_dir):
        return []
    out = []
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".json"):
            with open(os.path.join(out_dir, name)) as f:
                rec = json.load(f)
            if isinstance(rec, dict) and {"dataset", "task", "metrics"} <= rec.keys():
                out.append(rec)
    return out


def find_record(out_dir: str, task: str, dataset: str, model: str, pretrained: str) -> dict | None:
    """An existing result for exactly this (task, dataset, model, pretrained), for --skip-existing."""
    path = result_path(out_dir, {"dataset": dataset, "task": BENCHMARK_TASK[task]})
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        rec = json.load(f)
    return rec if rec.get("model") == model and rec.get("pretrained") == pretrained else None

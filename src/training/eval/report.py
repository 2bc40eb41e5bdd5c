"""Teacher-vs-student retention report: a markdown table and a PNG bar chart.

Layout (as in the DistillCLIP thesis summary): metric | teacher | student | retention %, with one section per
task and the average retention per section. Retention = student / teacher x 100 (for parameters, lower is better).

    python -m training.eval.report --student DIR --teacher DIR [--output DIR]

rebuilds the report from result JSON folders written by `python -m training.eval`.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from ..errors import UsageError, run_cli
from ..fileio import write_text
from .datasets import DISTRIBUTION_SHIFT_KINDS, KINDS
from .results import TASK_FROM_BENCHMARK, our_metrics, read_records

PRETTY = {
    "imagenet1k": "ImageNet-1k", "imagenetv2": "ImageNet-V2", "imagenet-r": "ImageNet-R", "imagenet-a": "ImageNet-A",
    "imagenet-sketch": "ImageNet-Sketch", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "stl10": "STL-10",
    "pets": "Oxford-IIIT Pet", "pets-coarse": "Oxford-IIIT Pet (coarse)", "coco": "COCO 5k", "flickr30k": "Flickr30k 1k",
}
SECTIONS = (
    ("zeroshot", "Zero-shot classification (top-1 %) ↑"),
    ("shift", "Robustness to natural distribution shift (zero-shot top-1 %) ↑"),
    ("retrieval", "Zero-shot retrieval (recall %) ↑"),
    ("linear_probe", "Linear probe (top-1 %) ↑"),
)
RETRIEVAL_ROWS = (("image_to_text_R@1", "I→T R@1"), ("text_to_image_R@1", "T→I R@1"),
                  ("image_to_text_R@5", "I→T R@5"), ("text_to_image_R@5", "T→I R@5"))


@dataclass
class Row:
    section: str
    label: str
    teacher: float | None
    student: float | None

    @property
    def retention(self) -> float | None:
        if self.teacher is None or self.student is None or self.teacher == 0:
            return None
        return 100.0 * self.student / self.teacher


def _display(record: dict) -> str:
    name = record["dataset"]
    return PRETTY.get(name, name)


def _section(record: dict) -> str:
    task = TASK_FROM_BENCHMARK.get(record["task"], record["task"])
    if task == "zeroshot" and record.get("details", {}).get("kind") in DISTRIBUTION_SHIFT_KINDS:
        return "shift"
    return task


def _order(record: dict) -> tuple:
    kind = record.get("details", {}).get("kind", "")
    return (KINDS.index(kind) if kind in KINDS else len(KINDS), record["dataset"])


def build_rows(student: list[dict], teacher: list[dict]) -> list[Row]:
    """Percent rows for every (task, dataset) either model has, sections in SECTIONS order."""
    by_key: dict[tuple, dict] = {}
    for role, records in (("student", student), ("teacher", teacher)):
        for rec in records:
            by_key.setdefault((rec["task"], rec["dataset"]), {})[role] = rec
    rows: list[Row] = []
    for section, _ in SECTIONS:
        pairs = [p for p in by_key.values() if _section(next(iter(p.values()))) == section]
        pairs.sort(key=lambda p: _order(next(iter(p.values()))))
        for pair in pairs:
            ref = next(iter(pair.values()))
            s = our_metrics(pair["student"]) if "student" in pair else {}
            t = our_metrics(pair["teacher"]) if "teacher" in pair else {}
            metrics = RETRIEVAL_ROWS if section == "retrieval" else (("top1", "top-1"),)
            for key, label in metrics:
                if key not in s and key not in t:
                    continue
                name = f"{_display(ref)} {label}" if section == "retrieval" else _display(ref)
                rows.append(Row(section, name, 100 * t[key] if key in t else None,
                                100 * s[key] if key in s else None))
    return rows


def _fmt(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def to_markdown(rows: list[Row], student_name: str, teacher_name: str,
                params: tuple[float, float] | None = None) -> str:
    """params: (teacher, student) parameter counts in millions, shown first (lower is better)."""
    lines = [f"Teacher: `{teacher_name}`  ", f"Student: `{student_name}`", "",
             "| metric | teacher | student | retention % |", "|---|---:|---:|---:|"]
    if params:
        t, s = params
        lines.append(f"| Parameters (M) ↓ | {t:.1f} | {s:.1f} | {_fmt(100 * s / t if t else None)} |")
    for section, title in SECTIONS:
        sec = [r for r in rows if r.section == section]
        if not sec:
            continue
        lines.append(f"| **{title}** | | | |")
        for r in sec:
            lines.append(f"| {r.label} | {_fmt(r.teacher)} | {_fmt(r.student)} | {_fmt(r.retention)} |")
        kept = [r.retention for r in sec if r.retention is not None]
        if len(sec) > 1 and kept:
            lines.append(f"| *Average* | | | {_fmt(sum(kept) / len(kept))} |")
    return "\n".join(lines) + "\n"


def draw_chart(rows: list[Row], path: str, student_name: str = "student", teacher_name: str = "teacher") -> str:
    """Horizontal grouped bars (teacher, student) per metric with the retention % written beside them."""
    rows = [r for r in rows if r.teacher is not None or r.student is not None]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _draw_chart_pil(rows, path, student_name, teacher_name)
    n = max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(9, 0.55 * n + 1.6))
    ys = list(range(n))[::-1]
    h = 0.38
    ax.barh([y + h / 2 for y in ys], [r.teacher or 0 for r in rows], h, label=f"teacher ({teacher_name})",
            color="#4c72b0")
    ax.barh([y - h / 2 for y in ys], [r.student or 0 for r in rows], h, label=f"student ({student_name})",
            color="#dd8452")
    for y, r in zip(ys, rows):
        top = max(r.teacher or 0, r.student or 0)
        ax.text(top + 1, y, f"{_fmt(r.retention, 1)}%" if r.retention is not None else "", va="center", fontsize=8)
    ax.set_yticks(ys)
    ax.set_yticklabels([r.label for r in rows], fontsize=8)
    ax.set_xlim(0, 115)
    ax.set_xlabel("% (retention = student / teacher written at the right)")
    ax.set_title("Teacher vs student")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.4 / n), ncol=1, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _draw_chart_pil(rows: list[Row], path: str, student_name: str, teacher_name: str) -> str:
    from PIL import Image, ImageDraw

    left, bar_w, row_h = 230, 420, 34
    img = Image.new("RGB", (left + bar_w + 90, 50 + row_h * max(len(rows), 1) + 30), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), f"teacher ({teacher_name}) = blue, student ({student_name}) = orange", fill="black")
    for i, r in enumerate(rows):
        y = 45 + i * row_h
        d.text((10, y + 8), r.label.replace("→", "->")[:36], fill="black")  # the default font has no arrows
        for j, (v, color) in enumerate(((r.teacher, (76, 114, 176)), (r.student, (221, 132, 82)))):
            w = int(bar_w * min(max(v or 0, 0), 100) / 100)
            d.rectangle([left, y + j * 14, left + w, y + j * 14 + 12], fill=color)
        if r.retention is not None:
            d.text((left + bar_w + 8, y + 8), f"{r.retention:.1f}%", fill="black")
    img.save(path)
    return path


def write_report(out_dir: str, student: list[dict], teacher: list[dict], student_name: str, teacher_name: str,
                 params: tuple[float, float] | None = None) -> dict[str, str]:
    """Write `retention.md` and `retention.png` into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    rows = build_rows(student, teacher)
    md = os.path.join(out_dir, "retention.md")
    write_text(md, "# Teacher vs student retention\n\n" + to_markdown(rows, student_name, teacher_name, params))
    png = draw_chart(rows, os.path.join(out_dir, "retention.png"), student_name, teacher_name)
    return {"markdown": md, "chart": png}


def run(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.eval.report", description=__doc__.splitlines()[0])
    p.add_argument("--student", required=True, help="folder of the student's result JSON files")
    p.add_argument("--teacher", required=True, help="folder of the teacher's result JSON files")
    p.add_argument("--output", default=None, help="where to write retention.md/.png (default: --student's parent)")
    args = p.parse_args(argv)
    student, teacher = read_records(args.student), read_records(args.teacher)
    if not student or not teacher:
        raise UsageError(f"no result JSON files in {args.student if not student else args.teacher}")
    name = lambda recs: f"{recs[0].get('model')} {recs[0].get('pretrained') or ''}".strip()  # noqa: E731
    out = args.output or os.path.dirname(os.path.abspath(args.student))
    paths = write_report(out, student, teacher, name(student), name(teacher))
    with open(paths["markdown"]) as f:
        print(f.read())
    print(f"wrote {paths['markdown']} and {paths['chart']}")
    return 0


def main(argv=None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())

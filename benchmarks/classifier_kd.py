"""Task-specific KD into a classifier on the embedded world: the structure of the STL10 experiments' tables.

    python benchmarks/classifier_kd.py --out demo        # reuses the quickstart's world and teacher when present

The task is the world's zero-shot classification (its class folder, 8 shapes): the first --labelled-per-class
images of each class are the labelled split, the rest the test split; the world's caption images (no labels used)
are the unlabelled split. Rows, all with the same student (timm resnet18, at 32 px for the CPU budget), steps, learning
rate and seed, each trained by `python -m training.main --student-kind classifier`:

    teacher rows:   the teacher's text head (zero-shot prompts) and its linear head (fitted on the labelled split)
    from scratch:   cross-entropy on the labelled split only (no teacher term)
    text / linear teacher x labelled only / labelled + unlabelled: KL to the teacher's logits at --kd-temperature

Every student run takes --steps optimizer steps (--train-num-samples = steps x batch), so the labelled-only runs
repeat their images and the rows differ only in where the images come from and what the targets are.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import open_clip
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

from quickstart import TEACHER, prepare_teacher, sh  # noqa: E402

from training.data.imagefolder import CLASSNAMES_FILE, TEMPLATES_FILE, read_image_folders  # noqa: E402
from training.data.transforms import EvalTransform  # noqa: E402
from training.models.image_student import load_image_student  # noqa: E402


def split_class_folder(src: str, out: str, labelled_per_class: int) -> tuple[str, str]:
    """Copies of `src` (class folders + classnames.txt): the first k images of each class, and the others."""
    table = read_image_folders([src])
    folders = {"labelled": os.path.join(out, "labelled"), "test": os.path.join(out, "test")}
    for d in folders.values():
        shutil.rmtree(d, ignore_errors=True)
    seen: dict[int, int] = {}
    for path, label in zip(table.images, table.labels):
        rank = seen.get(label, 0)
        seen[label] = rank + 1
        dest = folders["labelled" if rank < labelled_per_class else "test"]
        rel = os.path.relpath(path, src)
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copyfile(path, os.path.join(dest, rel))
    classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
    for d in folders.values():
        for name in (CLASSNAMES_FILE, TEMPLATES_FILE):
            if os.path.isfile(os.path.join(src, name)):
                shutil.copyfile(os.path.join(src, name), os.path.join(d, name))
        for sub in classes:  # every class folder exists in both splits, even if one ends up empty
            os.makedirs(os.path.join(d, sub), exist_ok=True)
    return folders["labelled"], folders["test"]


@torch.no_grad()
def top1(model_logits, folder: str, transform) -> float:
    table = read_image_folders([folder])
    hits = 0
    for i in range(0, len(table.images), 128):
        x = torch.stack([transform(Image.open(p).convert("RGB")) for p in table.images[i:i + 128]])
        hits += int((model_logits(x).argmax(1) == torch.tensor(table.labels[i:i + 128])).sum())
    return 100.0 * hits / len(table.images)


def teacher_rows(teacher_file: str, labelled: str, test: str) -> dict[str, float]:
    """The teacher's two heads on the test split, built exactly as the classifier runs build them."""
    from training.data.transforms import ImageFormat
    from training.eval.datasets import FileImages
    from training.eval.engine import encode_images
    from training.eval.linear_probe import fit_linear_head
    from training.eval.templates import read_templates
    from training.eval.zeroshot import build_classifier
    from training.models import create_clip

    model = create_clip(TEACHER, teacher_file, torch.device("cpu")).eval()
    transform = EvalTransform(ImageFormat.from_model(model))
    names = read_image_folders([labelled]).classnames
    templates = read_templates(os.path.join(labelled, TEMPLATES_FILE))
    head = build_classifier(model, open_clip.get_tokenizer(TEACHER), names, templates, torch.device("cpu"))
    lab = read_image_folders([labelled])
    feats, labels = encode_images(model, FileImages(lab.images, lab.labels), transform, torch.device("cpu"))
    weight, bias, _ = fit_linear_head(feats, labels, len(names))

    def emb(x):
        return torch.nn.functional.normalize(model.encode_image(x), dim=-1)
    return {"text": top1(lambda x: emb(x) @ head.T, test, transform),
            "linear": top1(lambda x: emb(x) @ weight.T + bias, test, transform)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo", help="the quickstart's folder (world and teacher reused when present)")
    p.add_argument("--model", default="resnet18", help="the student: a timm name or an open_clip config")
    p.add_argument("--image-size", type=int, default=32, help="the student's input size (the demo world's images are 32 px)")
    p.add_argument("--labelled-per-class", type=int, default=10)
    p.add_argument("--steps", type=int, default=120, help="optimizer steps of every student run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kd-temperature", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    opts = p.parse_args()
    torch.set_num_threads(opts.threads)
    t0 = time.time()
    world, teacher_file, _ = prepare_teacher(opts.out, opts.threads)
    work = os.path.join(opts.out, "classifier_kd")
    labelled, test = split_class_folder(world.zeroshot_dir, work, opts.labelled_per_class)
    unlabelled = os.path.join(world.data_root, "images", "train")
    n_lab = len(read_image_folders([labelled]).images)
    print(f"labelled {n_lab}, test {len(read_image_folders([test]).images)}, unlabelled "
          f"{len(read_image_folders([unlabelled]).images)} images; {opts.steps} steps of {opts.batch_size} per run",
          flush=True)
    teacher = teacher_rows(teacher_file, labelled, test)

    runs = [("from scratch (labels, CE)", None, False), ("text teacher", "text", False),
            ("linear teacher", "linear", False), ("text teacher", "text", True), ("linear teacher", "linear", True)]
    rows = []
    for title, head, with_unlabelled in runs:
        name = f"{head or 'scratch'}-{'lu' if with_unlabelled else 'l'}"
        data = f"{labelled},{unlabelled}" if with_unlabelled else labelled
        loss = (["--classifier-kd-weight", "0", "--classifier-ce-weight", "1"] if head is None else
                ["--teacher-head", head, "--kd-temperature", str(opts.kd_temperature)])
        cmd = [sys.executable, "-m", "training.main", "--student-kind", "classifier", "--model", opts.model,
               "--force-image-size", str(opts.image_size),
               "--teacher", TEACHER, "--teacher-pretrained", teacher_file, "--train-data", data, *loss]
        cmd += ["--batch-size", str(opts.batch_size), "--train-num-samples", str(opts.steps * opts.batch_size),
                "--epochs", "1", "--lr", str(opts.lr), "--wd", "0.05", "--warmup", "20", "--precision", "fp32",
                "--device", "cpu", "--workers", "1", "--logs", os.path.join(work, "runs"), "--name", name,
                "--log-every-n-steps", "50", "--zeroshot-frequency", "0", "--val-frequency", "0", "--seed", "0"]
        start = time.time()
        sh(cmd, os.path.join(work, f"{name}.log"), opts.threads)
        student = load_image_student(os.path.join(work, "runs", name, "checkpoints", "epoch_1.pt")).eval()
        acc = top1(student, test, EvalTransform(student.image_format))
        data_used = "labelled + unlabelled" if with_unlabelled else "labelled"
        rows.append((title, head or "none", data_used, acc))
        print(f"  {title:<26} {data_used:<22} top-1 {acc:5.1f}  ({time.time() - start:.0f}s)", flush=True)

    print(f"\nteacher ({TEACHER}): text head (zero-shot prompts) {teacher['text']:.1f}, linear head (fitted on "
          f"the {n_lab} labelled images) {teacher['linear']:.1f}; chance {100 / 8:.1f}\n")
    print("| student | teacher head | data | test top-1 |")
    print("|---|---|---|---:|")
    for title, head, data_used, acc in rows:
        print(f"| {opts.model}, {title} | {head} | {data_used} | {acc:.1f} |")
    print(f"\n{time.time() - t0:.0f}s in total")


if __name__ == "__main__":
    main()

"""`python -m training.predict MODEL IMAGE_OR_FOLDER... [--labels "cat,dog"] [--top-k 5] [--output preds.json]`

Top-k labels with probabilities for each image.

MODEL is a PyTorch file (a training checkpoint, or an export of `python -m training.export`) or an ONNX file of
`python -m training.export --onnx`:
- image-only students and classifiers classify with the head saved with them (no teacher, no tokenizer);
- two-tower students (and teachers) classify zero-shot among `--labels`, each label embedded by the text tower
  under the prompt templates (`--templates`: openai = the 80 CLIP prompts, simple, or a file), probabilities the
  softmax of logit_scale * cosine. A CLIP file that does not record its architecture needs `--model`.

A missing file, an empty label list or no readable image is one `error:` line and exit 2; an unreadable image among
others is reported on stderr and skipped (and listed under "skipped" in the JSON).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

from .data.transforms import EvalTransform, ImageFormat
from .errors import UsageError, run_cli
from .params import Parser


class TorchPredictor:
    """A PyTorch image student (its head) or open_clip CLIP (zero-shot over labels)."""

    def __init__(self, path: str, model_name: str | None):
        from .models.image_student import load_image_student

        self.student = load_image_student(path)
        if self.student is not None:
            self.student.eval()
            self.image_format, self.classnames, self.two_tower = self.student.image_format, self.student.classnames, \
                False
            return
        from .export import recorded_args
        from .models import create_clip
        from .models.weights import quiet_random_init_warning

        args = recorded_args(path)
        name = model_name or args.get("model")
        if not name:
            raise UsageError(f"{path} does not record its architecture: pass --model")
        size = args.get("force_image_size")
        with quiet_random_init_warning():
            self.clip = create_clip(name, path, torch.device("cpu"), **({"force_image_size": size} if size else {}))
        self.clip.eval()
        self.image_format, self.classnames, self.two_tower = ImageFormat.from_model(self.clip), [], True
        self.arch = self.clip.arch_name

    @torch.no_grad()
    def head_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.student.classify(images)

    @torch.no_grad()
    def zeroshot_logits(self, images: torch.Tensor, labels: list[str], templates) -> torch.Tensor:
        import open_clip

        from .eval.zeroshot import build_classifier

        head = build_classifier(self.clip, open_clip.get_tokenizer(self.arch), labels, templates, torch.device("cpu"))
        emb = torch.nn.functional.normalize(self.clip.encode_image(images).float(), dim=-1)
        return self.clip.logit_scale.exp() * emb @ head.T


class OnnxPredictor:
    """An `image_encoder.onnx` (or its INT8 version); two-tower: with the sibling text_encoder.onnx."""

    def __init__(self, path: str):
        from .onnx_export import read_meta, session

        self.meta = read_meta(path)
        self.image = session(path)
        self.image_format = ImageFormat(**self.meta["image_format"])
        self.classnames = list(self.meta.get("classnames") or [])
        self.two_tower = self.meta["kind"] == "clip"
        self.text_path = os.path.join(os.path.dirname(path), self.meta.get("text_encoder") or "")
        if self.two_tower and not os.path.isfile(self.text_path):
            raise UsageError(f"{path} is a two-tower export: zero-shot needs its text encoder {self.text_path}")

    def _run_image(self, images: torch.Tensor) -> torch.Tensor:
        name = self.image.get_inputs()[0].name
        return torch.from_numpy(self.image.run(None, {name: images.numpy()})[0])

    def head_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self._run_image(images)

    def zeroshot_logits(self, images: torch.Tensor, labels: list[str], templates) -> torch.Tensor:
        import open_clip

        import training  # noqa: F401 (registers the project's configs, whose tokenizers open_clip then finds)

        from .eval.templates import render
        from .onnx_export import session

        text = session(self.text_path)
        tokenizer = open_clip.get_tokenizer(self.meta["arch"])
        rows = []
        for label in labels:
            tokens = tokenizer([render(t, label) for t in templates]).numpy().astype(np.int64)
            emb = torch.from_numpy(text.run(None, {text.get_inputs()[0].name: tokens})[0])
            rows.append(torch.nn.functional.normalize(emb.mean(0), dim=-1))
        head = torch.stack(rows)
        return self.meta["logit_scale"] * self._run_image(images) @ head.T


def load_predictor(path: str, model_name: str | None):
    if not os.path.isfile(path):
        raise UsageError(f"model file not found: {path}")
    return OnnxPredictor(path) if path.endswith(".onnx") else TorchPredictor(path, model_name)


def collect_images(inputs: list[str]) -> list[str]:
    from .eval.datasets import list_images

    paths: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = list_images(item)
            if not found:
                raise UsageError(f"no image in folder {item}")
            paths += found
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise UsageError(f"image not found: {item}")
    return paths


def parse_labels(text: str | None) -> list[str] | None:
    if text is None:
        return None
    labels = [x.strip() for x in text.split(",") if x.strip()]
    if not labels:
        raise UsageError(f"--labels {text!r} names no label")
    return labels


def read_template_option(value: str) -> list:
    from .eval import templates as T

    if value == "openai":
        return list(T.OPENAI_IMAGENET_TEMPLATES)
    if value == "simple":
        return list(T.SIMPLE_IMAGENET_TEMPLATES)
    if not os.path.isfile(value):
        raise UsageError(f"--templates: expected openai, simple or a file, got {value!r}")
    return list(T.read_templates(value))


def predict(predictor, images: list[str], labels: list[str] | None, templates: list, top_k: int,
            batch_size: int = 32) -> tuple[list[dict], list[dict]]:
    """([{"image", "top": [{"label", "probability"}]}], [{"image", "reason"}] of the skipped ones)."""
    from .data.csv import open_image

    if predictor.two_tower and labels is None:
        raise UsageError("a two-tower model classifies zero-shot: pass --labels \"cat,dog,...\"")
    if not predictor.two_tower and labels is not None:
        raise UsageError("this model classifies with its saved head (classes: "
                         f"{', '.join(predictor.classnames[:5])}{', ...' if len(predictor.classnames) > 5 else ''}); "
                         "it has no text tower for --labels")
    if not predictor.two_tower and not predictor.classnames:
        raise UsageError("this image-only student has no class head (train it with class names, see README)")
    names = labels if labels is not None else predictor.classnames
    transform = EvalTransform(predictor.image_format)
    results, skipped, pending = [], [], []

    def flush():
        if not pending:
            return
        x = torch.stack([t for _, t in pending])
        logits = (predictor.zeroshot_logits(x, names, templates) if labels is not None
                  else predictor.head_logits(x))
        probs = logits.float().softmax(-1)
        k = min(top_k, probs.shape[1])
        values, indices = probs.topk(k, dim=-1)
        for (path, _), v, i in zip(pending, values.tolist(), indices.tolist()):
            results.append({"image": path, "top": [{"label": names[j], "probability": p} for j, p in zip(i, v)]})
        pending.clear()

    for path in images:
        image, reason = open_image(path)
        if image is None:
            skipped.append({"image": path, "reason": reason})
            continue
        pending.append((path, transform(image)))
        if len(pending) == batch_size:
            flush()
    flush()
    if not results:
        raise UsageError(f"no readable image among the {len(images)} given ({skipped[0]['reason'].replace('_', ' ')}"
                         f": {skipped[0]['image']})")
    return results, skipped


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m training.predict", description=__doc__.splitlines()[0].strip("`"),
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_file", help="training checkpoint, export (.pt/.safetensors) or ONNX file")
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--labels", default=None, help="comma list of class names (two-tower models: zero-shot)")
    p.add_argument("--templates", default="openai", help="prompt templates for --labels: openai, simple or a file")
    p.add_argument("--model", default=None, help="architecture of a CLIP file that does not record it")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--output", default=None, help="write the predictions as JSON")
    return p


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        raise UsageError("--top-k and --batch-size must be >= 1")
    labels = parse_labels(args.labels)
    templates = read_template_option(args.templates) if labels is not None else []
    images = collect_images(args.images)
    predictor = load_predictor(args.model_file, args.model)
    results, skipped = predict(predictor, images, labels, templates, args.top_k, args.batch_size)
    for s in skipped:  # reported once there is something else to show (with none readable, predict raised)
        print(f"skipped {s['image']}: {s['reason'].replace('_', ' ')}", file=sys.stderr)
    for r in results:
        print(f"{r['image']}: " + ", ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top"]))
    if args.output:
        from .fileio import write_json

        write_json(args.output, {"model": args.model_file, "predictions": results, "skipped": skipped}, indent=2)
    return 0


def main(argv=None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m training.export CKPT OUT`: a student-only file that open_clip loads as it is.

    import training  # registers the project's configs (ViT-T-16, timm-*, tiny-*) with open_clip
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-T-16", pretrained="student.pt")

Loss-side heads, optimizer and RNG state are left out. `.safetensors` output is written when OUT ends with it.

`python -m training.export CKPT OUT_DIR --hf [--eval-dir EVAL]` writes open_clip's Hugging Face layout instead
(open_clip_config.json with the full model config, open_clip_model.safetensors, a README.md model card), which
plain open_clip loads without this project: `open_clip.create_model_and_transforms("local-dir:OUT_DIR")`, or
`"hf-hub:ORG/NAME"` after `huggingface_hub.upload_folder` (docs/export.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

from .errors import UsageError, run_cli, usage_error
from .fileio import atomic_path, read_json, torch_save, write_bytes, write_json, write_text
from .pretrained import is_registry_name, lookup
from .pretrained import resolve as resolve_pretrained


def released(checkpoint: str, model: str | None) -> tuple[str, str | None]:
    """A registry name -> (its cached file, its registered architecture unless --model says otherwise); released
    files record no flags, so the registry names the architecture (said in the log)."""
    if not is_registry_name(checkpoint):
        return checkpoint, model
    if model is None:
        model = lookup(checkpoint).arch
        logging.info("%s: architecture %s, from the registry", checkpoint, model)
    return resolve_pretrained(checkpoint, model), model


def export_student(checkpoint: str, out: str, model: str | None = None) -> tuple[str, dict]:
    """Write the student's weights to `out`; returns the architecture name and the keyword arguments to pass to
    open_clip to load them (`force_image_size` when the student was trained at another size)."""
    from .models import create_clip, read_state_dict

    checkpoint, model = released(checkpoint, model)
    if not os.path.isfile(checkpoint):
        raise UsageError(f"checkpoint not found: {checkpoint}")
    state_dict = read_state_dict(checkpoint)  # weights_only; takes the 'model' entry of a training checkpoint
    args = recorded_args(checkpoint)
    model = model or args.get("model")
    if model is None:
        raise UsageError(f"{checkpoint} does not record its architecture: pass --model")
    size = args.get("force_image_size")  # the student was trained at this size: rebuild it so
    load_kwargs = {"force_image_size": size} if size else {}
    clip = create_clip(model, None, torch.device("cpu"), **load_kwargs)
    missing, unexpected = clip.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise UsageError(f"checkpoint does not match '{model}': missing {list(missing)[:3]}, "
                         f"unexpected {list(unexpected)[:3]}")
    clean = {k: v.detach().contiguous().cpu() for k, v in clip.state_dict().items()}
    if out.endswith(".safetensors"):
        from safetensors.torch import save_file

        with atomic_path(out) as tmp:
            save_file(clean, tmp)
    else:
        torch_save(clean, out)
    return clip.arch_name, load_kwargs


# open_clip's Hugging Face layout (open_clip/constants.py, factory.py's local-dir: / hf-hub: loading)
HF_CONFIG_NAME = "open_clip_config.json"
HF_WEIGHTS_NAME = "open_clip_model.safetensors"
CARD_NAME = "README.md"
CHART_NAME = "retention.png"
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")  # what open_clip's save_config_for_hf records


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"output folder {out_dir} exists and is not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise UsageError(f"output folder {out_dir} is not empty (pass --overwrite to replace the export in it)")


def read_eval_dir(eval_dir: str) -> dict:
    """summary.json (required) and retention.md / retention.png (written when the evaluation had a teacher) of a
    `python -m training.eval` output folder."""
    if not os.path.isdir(eval_dir):
        raise UsageError(f"evaluation folder not found: {eval_dir}")
    summary_path = os.path.join(eval_dir, "summary.json")
    if not os.path.isfile(summary_path):
        raise UsageError(f"{eval_dir} has no summary.json (is it a `python -m training.eval --output` folder?)")
    try:
        summary = read_json(summary_path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise usage_error(f"cannot read {summary_path}", exc) from exc
    student = summary.get("student") if isinstance(summary, dict) else None
    teacher = summary.get("teacher") if isinstance(summary, dict) else None
    if not isinstance(student, dict) or not isinstance(student.get("metrics"), dict) or not (
            teacher is None or isinstance(teacher, dict) and isinstance(teacher.get("metrics"), dict)):
        raise UsageError(f"{summary_path} is not a training.eval summary (no student/teacher metrics)")
    out = {"summary": summary, "retention_md": None, "chart": None}
    md = os.path.join(eval_dir, "retention.md")
    if os.path.isfile(md):
        with open(md, encoding="utf-8") as f:
            out["retention_md"] = f.read()
    chart = os.path.join(eval_dir, CHART_NAME)
    if os.path.isfile(chart):
        with open(chart, "rb") as f:
            out["chart"] = f.read()
    return out


def recorded_args(checkpoint: str) -> dict:
    """The flat training config a training checkpoint records (`state["args"]`); {} for a bare state_dict."""
    if checkpoint.endswith(".safetensors"):
        return {}
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise usage_error(f"cannot read checkpoint {checkpoint}", exc) from exc
    args = state.get("args") if isinstance(state, dict) else None
    info = {k: state[k] for k in ("epoch", "step", "world_size") if isinstance(state, dict) and k in state}
    return {**(args if isinstance(args, dict) else {}), **{f"_{k}": v for k, v in info.items()}}


def hf_model_cfg(arch: str, args: dict) -> dict:
    """The architecture's full open_clip config, so plain open_clip needs none of this project's registrations."""
    import open_clip

    cfg = open_clip.get_model_config(arch)
    if not cfg:
        raise UsageError(f"open_clip has no config for '{arch}'")
    if args.get("force_image_size"):
        cfg["vision_cfg"]["image_size"] = args["force_image_size"]
    return cfg


def hf_preprocess_cfg(arch: str, pretrained: str | None) -> dict:
    """The student's image preprocessing as open_clip builds it: defaults, then its pretrained tag's values (the
    student started from a tag: it was trained with that tag's normalisation)."""
    from dataclasses import asdict

    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    from .models.weights import is_local_path

    cfg = asdict(PreprocessCfg())
    if pretrained and not is_local_path(pretrained):
        cfg = merge_preprocess_dict(cfg, open_clip.get_pretrained_cfg(arch, pretrained) or {})
    return {k: (list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k]) for k in _PREPROCESS_KEYS}


def _loss_spec(args: dict) -> str:
    from .config import DistillConfig, section_from
    from .distill.spec import resolve_spec

    section = section_from(DistillConfig, args)
    try:
        spec = resolve_spec(section.distill, section.recipe, section.overrides)
    except UsageError:
        return f"`{section.distill or section.recipe}` (as recorded)"
    return f"`{spec}` (from {spec.source})"


def _pct(value) -> str:
    return f"{100 * value:.2f}" if isinstance(value, (int, float)) else "–"


def _results_section(evaluation: dict) -> list[str]:
    summary = evaluation["summary"]
    student = summary["student"]["metrics"]
    teacher = (summary.get("teacher") or {}).get("metrics") or {}
    retention = summary.get("retention_percent") or {}
    lines = ["## Evaluation", "", "Results of `python -m training.eval` (%):", ""]
    if teacher:
        lines += ["| metric | student | teacher | retention % |", "|---|---:|---:|---:|"]
        lines += [f"| `{k}` | {_pct(v)} | {_pct(teacher.get(k))} | "
                  f"{f'{retention[k]:.1f}' if k in retention else '–'} |" for k, v in sorted(student.items())]
    else:
        lines += ["| metric | student |", "|---|---:|"]
        lines += [f"| `{k}` | {_pct(v)} |" for k, v in sorted(student.items())]
    if evaluation["retention_md"]:
        body = evaluation["retention_md"].strip().splitlines()
        if body and body[0].startswith("# "):
            body = body[1:]
        lines += ["", "### Teacher vs student retention", "", *body]
    if evaluation["chart"]:
        lines += ["", f"![teacher vs student retention]({CHART_NAME})"]
    return lines + [""]


def _teacher_line(args: dict) -> str:
    if "teacher" not in args:
        return "- **Teacher:** not recorded"
    teacher = args["teacher"]
    if not teacher:
        return "- **Teacher:** none"
    line = f"- **Teacher:** `{teacher}`"
    if args.get("teacher_pretrained"):
        line += f" with weights `{args['teacher_pretrained']}`"
    if args.get("teacher_cache"):
        line += f" (its embeddings read from the teacher cache `{args['teacher_cache']}`)"
    return line


def model_card(name: str, arch: str, model_cfg: dict, args: dict, parameters_m: float,
               evaluation: dict | None = None, license: str | None = None) -> str:
    """The README.md of the export: Hub metadata, what the student is and how it was made, how to load it."""
    teacher = args.get("teacher")
    data = args.get("train_data") or ("synthetic" if args.get("dataset_type") == "synthetic" else None)
    meta = ["---", "tags:", "- clip", "- open_clip", "- knowledge-distillation", "library_name: open_clip",
            "pipeline_tag: zero-shot-image-classification"]
    if license:
        meta.append(f"license: {license}")
    meta.append("---")
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    tower = vision.get("timm_model_name") or (f"ViT, {vision.get('layers')} layers, width {vision.get('width')}, "
                                              f"patch {vision.get('patch_size')}")
    text_tower = text.get("hf_model_name") or (f"transformer, {text.get('layers')} layers, "
                                               f"width {text.get('width')}")
    what = (f"distilled from `{teacher}`" if teacher else "trained without a teacher") if args else "exported"
    lines = [*meta, f"# {name}", "",
             f"A CLIP student ({arch}) {what} with clip-kd on open_clip.", "",
             "## Model details", "",
             f"- **Architecture:** `{arch}`: embedding dim {model_cfg.get('embed_dim')}, image tower {tower} at "
             f"{vision.get('image_size')} px, text tower {text_tower}, context length "
             f"{text.get('context_length', 77)}; {parameters_m:.2f} M parameters. The full config is "
             f"`model_cfg` in `{HF_CONFIG_NAME}`.",
             _teacher_line(args),
             f"- **Student initialisation:** `{args['pretrained']}`" if args.get("pretrained")
             else f"- **Student initialisation:** {'random' if args else 'not recorded'}",
             f"- **Training data:** `{data}`" if data else "- **Training data:** not recorded",
             f"- **Loss:** {_loss_spec(args)}" if args else "- **Loss:** not recorded"]
    if args:
        steps = args.get("_step")
        lines.append(f"- **Training:** {args.get('epochs')} epoch(s) scheduled, "
                     + (f"{steps} optimizer steps done, " if steps is not None else "")
                     + f"batch {args.get('batch_size')} per process x {args.get('_world_size', 1)} process(es), "
                     f"lr {args.get('lr')}, precision {args.get('precision')}")
    lines += ["", "## Usage", "", "```python", "import open_clip", "",
              "# this folder, or hf-hub:ORG/NAME once it is uploaded to the Hugging Face Hub",
              'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:PATH/TO/THIS/FOLDER")',
              'tokenizer = open_clip.get_tokenizer("local-dir:PATH/TO/THIS/FOLDER")', "```", ""]
    if evaluation:
        lines += _results_section(evaluation)
    if args:
        shown = {k: v for k, v in sorted(args.items()) if not k.startswith("_")}
        lines += ["## Training configuration", "", "<details><summary>the run's recorded flags</summary>", "",
                  "```json", json.dumps(shown, indent=1, default=str), "```", "", "</details>"]
    return "\n".join(lines) + "\n"


def export_hf(checkpoint: str, out_dir: str, model: str | None = None, eval_dir: str | None = None,
              overwrite: bool = False, name: str | None = None, license: str | None = None) -> str:
    """Write open_clip's Hugging Face layout into `out_dir`: open_clip_config.json (model_cfg, preprocess_cfg),
    open_clip_model.safetensors and a README.md model card. Returns the open_clip model name to load it with."""
    import open_clip

    from .models.weights import quiet_random_init_warning

    _check_out_dir(out_dir, overwrite)
    evaluation = read_eval_dir(eval_dir) if eval_dir else None
    checkpoint, model = released(checkpoint, model)
    if not os.path.isfile(checkpoint):
        raise UsageError(f"checkpoint not found: {checkpoint}")
    args = recorded_args(checkpoint)
    with quiet_random_init_warning():  # the model is built empty, then the checkpoint is loaded into it
        arch, _ = export_student(checkpoint, os.path.join(out_dir, HF_WEIGHTS_NAME), model)
    model_cfg = hf_model_cfg(arch, args)
    write_json(os.path.join(out_dir, HF_CONFIG_NAME),
               {"model_cfg": model_cfg, "preprocess_cfg": hf_preprocess_cfg(arch, args.get("pretrained"))}, indent=2)
    location = "local-dir:" + os.path.abspath(out_dir)
    try:  # open_clip's own loader, strict: the folder is checked the way its users will load it
        with quiet_random_init_warning():
            loaded = open_clip.create_model(location, device="cpu")
    except Exception as exc:
        raise usage_error(f"the export in {out_dir} does not load in open_clip", exc) from exc
    parameters_m = sum(p.numel() for p in loaded.parameters()) / 1e6
    chart = os.path.join(out_dir, CHART_NAME)
    if evaluation and evaluation["chart"]:
        write_bytes(chart, evaluation["chart"])
    elif os.path.exists(chart):  # a previous export's chart (--overwrite) would not match this card
        os.remove(chart)
    card = model_card(name or os.path.basename(os.path.abspath(out_dir)), arch, model_cfg, args, parameters_m,
                      evaluation, license)
    write_text(os.path.join(out_dir, CARD_NAME), card)
    return location


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="training checkpoint (logs/<name>/checkpoints/epoch_N.pt)")
    p.add_argument("out", help="output file (.pt or .safetensors); with --hf, the output folder")
    p.add_argument("--model", default=None, help="architecture (default: the one recorded in the checkpoint)")
    hf = p.add_argument_group("Hugging Face layout (--hf)")
    hf.add_argument("--hf", action="store_true",
                    help="write open_clip's Hugging Face folder: open_clip_config.json, open_clip_model.safetensors, "
                         "README.md (model card); it loads as local-dir:OUT, and as hf-hub:ORG/NAME once uploaded")
    hf.add_argument("--eval-dir", default=None,
                    help="a `python -m training.eval --output` folder: its results and retention table go in the card")
    hf.add_argument("--name", default=None, help="the model's name in the card (default: the folder's name)")
    hf.add_argument("--license", default=None, help="license for the card's metadata (e.g. mit); omitted if unset")
    hf.add_argument("--overwrite", action="store_true", help="replace the export in a non-empty output folder")
    add_onnx_flags(p)
    return p


def add_onnx_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ONNX (--onnx; needs the onnx extra: onnx, onnxruntime)")
    g.add_argument("--onnx", action="store_true",
                   help="write OUT/image_encoder.onnx (with the student's class head when it has one) and, for "
                        "two-tower students, OUT/text_encoder.onnx: dynamic batch, opset 17, checked against "
                        "PyTorch (docs/export.md)")
    g.add_argument("--onnx-int8", action="store_true",
                   help="with --onnx: also OUT/image_encoder.int8.onnx, static INT8 calibrated on training images")
    g.add_argument("--calib-data", default=None,
                   help="with --onnx-int8: calibration images (folder or CSV; default: the recorded --train-data)")
    g.add_argument("--calib-images", type=int, default=256, help="with --onnx-int8: number of calibration images")


def run_onnx(args) -> int:
    from .onnx_export import export_onnx

    if args.calib_images < 1:
        raise UsageError(f"--calib-images must be >= 1, got {args.calib_images}")
    report = export_onnx(args.checkpoint, args.out, args.model, int8=args.onnx_int8, calib_data=args.calib_data,
                         calib_images=args.calib_images)
    for name, note in report.items():
        detail = f"max abs difference vs PyTorch {note:.2e}" if isinstance(note, float) else note
        print(f"wrote {os.path.join(args.out, name)} ({detail})")
    print(f"run it with: python -m training.predict {os.path.join(args.out, 'image_encoder.onnx')} IMAGES...")
    return 0


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.onnx:
        if args.hf:
            raise UsageError("choose one of --onnx and --hf")
        return run_onnx(args)
    for flag in ("onnx_int8", "calib_data"):
        if vars(args)[flag]:
            raise UsageError(f"--{flag.replace('_', '-')} needs --onnx")
    if args.hf:
        location = export_hf(args.checkpoint, args.out, args.model, eval_dir=args.eval_dir,
                             overwrite=args.overwrite, name=args.name, license=args.license)
        print(f"wrote {args.out}; load it with: open_clip.create_model_and_transforms({location!r}) "
              f"(no clip-kd import needed); upload it with huggingface_hub.upload_folder (docs/export.md)")
        return 0
    for flag in ("eval_dir", "name", "license", "overwrite"):
        if vars(args)[flag]:
            raise UsageError(f"--{flag.replace('_', '-')} needs --hf")
    from .models.image_student import load_image_student, save_image_student

    image_student = load_image_student(released(args.checkpoint, args.model)[0])
    if image_student is not None:  # image-only students and classifiers: the student and its head, one file
        save_image_student(image_student, args.out)
        print(f"wrote {args.out}; predict with: python -m training.predict {args.out} IMAGES...")
        return 0
    arch, load_kwargs = export_student(args.checkpoint, args.out, args.model)
    extra = "".join(f", {k}={v!r}" for k, v in load_kwargs.items())
    print(f"wrote {args.out}; load it with: import training, open_clip; "
          f"open_clip.create_model_and_transforms({arch!r}, pretrained={args.out!r}{extra})")
    return 0


def main(argv=None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())

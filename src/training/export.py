"""`python -m training.export CKPT OUT`: a student-only file that open_clip loads as it is.

    import training  # registers the project's configs (ViT-T-16, timm-*, tiny-*) with open_clip
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-T-16", pretrained="student.pt")

Loss-side heads, optimizer and RNG state are left out. `.safetensors` output is written when OUT ends with it.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .errors import UsageError, run_cli
from .fileio import atomic_path, torch_save


def export_student(checkpoint: str, out: str, model: str | None = None) -> str:
    """Write the student's weights to `out`; returns the architecture name to pass to open_clip."""
    from .models import create_clip, read_state_dict

    if not os.path.isfile(checkpoint):
        raise UsageError(f"checkpoint not found: {checkpoint}")
    state_dict = read_state_dict(checkpoint)  # weights_only; takes the 'model' entry of a training checkpoint
    if model is None:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model = (ckpt.get("args") or {}).get("model") if isinstance(ckpt, dict) else None
        if model is None:
            raise UsageError(f"{checkpoint} does not record its architecture: pass --model")
    clip = create_clip(model, None, torch.device("cpu"))
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
    return clip.arch_name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="training checkpoint (logs/<name>/checkpoints/epoch_N.pt)")
    p.add_argument("out", help="output file (.pt or .safetensors)")
    p.add_argument("--model", default=None, help="architecture (default: the one recorded in the checkpoint)")
    return p


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    arch = export_student(args.checkpoint, args.out, args.model)
    print(f"wrote {args.out}; load it with: import training, open_clip; "
          f"open_clip.create_model_and_transforms({arch!r}, pretrained={args.out!r})")
    return 0


def main(argv=None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Shared test helpers (plain functions; fixtures live in conftest.py)."""

import os
import socket

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_image_csv(folder, n: int = 32, size: int = 32, bad: dict | None = None, seed: int = 0) -> str:
    """A tab-separated CSV of n coloured JPEGs with captions; `bad` = {row: 'missing'|'corrupt'|'empty'}."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    names = list(COLOURS)
    rows = ["filepath\ttitle"]
    bad = bad or {}
    for i in range(n):
        colour = names[i % len(names)]
        rel = f"images/{i:04d}.jpg"
        pixels = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        kind = bad.get(i)
        if kind != "missing":
            Image.fromarray(pixels).save(os.path.join(folder, rel), quality=90)
        if kind == "corrupt":
            with open(os.path.join(folder, rel), "wb") as f:
                f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
        caption = "" if kind == "empty" else f"a {colour} square number {i}"
        rows.append(f"{rel}\t{caption}")
    path = os.path.join(folder, "train.csv")
    with open(path, "w") as f:
        f.write("\n".join(rows) + "\n")
    return path


def kd_world(root, n: int = 24, size: int = 64) -> dict:
    """A tiny distillation set-up under `root`: an image CSV and a saved (seeded, untrained) tiny-teacher."""
    import torch

    from training.models import create_clip

    csv = write_image_csv(str(root / "data"), n=n, size=size)
    teacher = str(root / "teacher.pt")
    torch.manual_seed(7)
    torch.save(create_clip("tiny-teacher", None, torch.device("cpu")).state_dict(), teacher)
    return {"root": root, "csv": csv, "data_root": str(root / "data"), "teacher": teacher}


def small_world(root) -> dict:
    """12 image-caption pairs (64 px): 3 optimizer steps an epoch at batch 4."""
    csv = write_image_csv(str(root / "data"), n=12, size=64)
    return {"root": root, "csv": csv, "data_root": str(root / "data")}


def small_run_argv(world: dict, name: str, *extra) -> list[str]:
    """A 2-epoch tiny-student run over `small_world` (3 optimizer steps an epoch, batch 4), task loss only."""
    return ["--model", "tiny-student", "--train-data", world["csv"], "--data-root", world["data_root"],
            "--batch-size", "4", "--epochs", "2", "--lr", "1e-3", "--warmup", "1", "--precision", "fp32",
            "--workers", "0", "--logs", str(world["root"] / "logs"), "--name", name, "--zeroshot-frequency", "0",
            "--val-frequency", "0", "--device", "cpu", *extra]


def relative_distance(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over all tensors of two state dicts with the same keys."""
    assert a.keys() == b.keys()
    diff = sum(float((a[k].float() - b[k].float()).norm() ** 2) for k in a) ** 0.5
    return diff / sum(float(a[k].float().norm() ** 2) for k in a) ** 0.5


def optimizer_tensors(state: dict) -> dict:
    return {f"{i}.{k}": v for i, s in state["state"].items() for k, v in s.items() if hasattr(v, "dim")}

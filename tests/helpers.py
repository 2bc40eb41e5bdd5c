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

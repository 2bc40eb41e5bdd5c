"""The embedded demo world: a procedurally generated image-caption dataset that needs no network.

Each image shows one coloured shape on a noisy, tinted background. Its caption always names the shape, and each
other attribute (size, colour, texture, position) with probability ``attribute_prob``, e.g.
"a large red striped circle on the left", "there is a blue star", "a dotted heart at the top". The zero-shot
classes are the 8 shapes: the captions name them plainly, the images show them plainly (large, high-contrast
silhouettes), and colour, size, texture, position, rotation, background and lighting vary as nuisance.
Everything is a pure function of ``(seed, split, index)``, so the same parameters give byte-identical files.

On-disk layout (``DIR`` is the world root; it is also the ``--data-root`` the CSVs are relative to)::

    DIR/train.csv                      tab-separated, header "filepath<TAB>title"; filepath "images/train/000000.jpg"
    DIR/distill.csv                    the first ``num_distill`` rows of train.csv: the students' (small) training set
    DIR/val.csv                        same for the validation split (retrieval: one image, one caption per row)
    DIR/images/{train,val}/NNNNNN.jpg  JPEG, quality 90, 4:4:4 chroma
    DIR/zeroshot/<shape>/NNNNNN.jpg    zero-shot classification by shape: other attributes random
    DIR/zeroshot/classnames.txt        one class name per line; line i = class index i = i-th folder in sorted order
    DIR/zeroshot/templates.txt         prompt templates, "{}" stands for the class name
    DIR/world.json                     marker with the generation parameters, written last
    DIR/.world.lock                    empty lock file (concurrent callers, e.g. torchrun ranks, generate once)

Zero-shot class mapping (folder name == class name, alphabetical): 0 circle, 1 cross, 2 diamond, 3 heart,
4 ring, 5 square, 6 star, 7 triangle; chance is 1/8 = 12.5%.

Usage::

    from training.demo.world import generate_world
    w = generate_world("data/world", seed=0)      # a fast no-op when an identical world is already there
    # --train-data w.train_csv (or w.distill_csv) --val-data w.val_csv --data-root w.data_root
    # --zeroshot-data w.zeroshot_dir

    python -m training.demo.world --out data/world [--seed 0 --num-train 6000 --num-val 500 --image-size 32]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from training.errors import UsageError, first_line, run_cli
from training.fileio import write_text

# Bump when the generator's output changes for the same parameters (invalidates existing worlds).
WORLD_VERSION = 2
MARKER = "world.json"

SHAPES = ("circle", "cross", "diamond", "heart", "ring", "square", "star", "triangle")  # sorted: class index order
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 20),
    "yellow": (240, 220, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "purple": (140, 40, 180),
    "pink": (250, 120, 190),
    "black": (20, 20, 20),
}
SIZES = ("small", "large")
TEXTURES = ("solid", "striped", "dotted")
POSITIONS = ("left", "right", "top", "bottom", "centre")
# What a caption may name besides the shape. Colour and texture are drawn but never named: pure nuisance, so
# the contrastive task cannot be solved by colour alone and shape is what the models must learn.
NAMED_ATTRIBUTES = ("size", "position")

# Object radius as a fraction of the image side, per size word.
_RADIUS = {"small": (0.22, 0.25), "large": (0.30, 0.34)}
_BOUND = 1.15  # every shape fits in a disc of _BOUND * radius around its centre
# Off-centre objects sit this far (fraction of the side) from their edge; the other axis is jittered by _JITTER.
_EDGE_GAP = (0.0, 0.04)
_JITTER = 0.04

POSITION_PHRASES = {
    "left": ("on the left",),
    "right": ("on the right",),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
    "centre": ("in the centre", "in the middle"),
}
_PREFIXES = ("", "", "a picture of ", "there is ", "an image of ")

# Prompts in the captions' own grammar (the prefixes above, the bare noun phrase).
ZEROSHOT_TEMPLATES = (
    "a {}.",
    "a {}",
    "a picture of a {}.",
    "there is a {}.",
    "an image of a {}.",
    "a photo of a {}.",
)

_SPLIT_CODE = {"train": 0, "val": 1, "zeroshot": 2}
SPLITS = tuple(_SPLIT_CODE)


# ---------------------------------------------------------------------------------------------------------------
# scene sampling
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class WorldObject:
    shape: str
    color: str
    size: str
    texture: str
    position: str
    cx: float  # centre, fraction of the image side
    cy: float
    radius: float  # fraction of the image side
    angle: float  # rotation jitter (degrees)
    pattern_angle: float  # stripe direction (degrees)
    pattern_phase: float  # in [0, 1)


@dataclass
class Scene:
    objects: list[WorldObject]  # one object (a list, so the renderer and the tests need no special case)
    background: tuple[int, int, int]
    gradient: tuple[float, float]  # brightness change across x and y (full image)
    caption: str = ""
    named: tuple[str, ...] = ()  # the attributes the caption names besides the shape
    extra: dict = field(default_factory=dict)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SPLIT_CODE[split], int(index)])


def _centre(rng: np.random.Generator, position: str, radius: float) -> tuple[float, float]:
    """Object centre for a position word: off-centre objects hug their edge, so position is visible at any size."""
    off = 0.5 - _BOUND * radius - rng.uniform(*_EDGE_GAP)  # distance of the centre from the image centre
    jitter = rng.uniform(-_JITTER, _JITTER)
    dx, dy = {"left": (-off, jitter), "right": (off, jitter), "top": (jitter, -off), "bottom": (jitter, off),
              "centre": (jitter, rng.uniform(-_JITTER, _JITTER))}[position]
    return 0.5 + dx, 0.5 + dy


def _sample_object(rng: np.random.Generator, shape: str | None = None) -> WorldObject:
    shape = shape if shape is not None else SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    size = SIZES[rng.integers(len(SIZES))]
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    position = POSITIONS[rng.integers(len(POSITIONS))]
    radius = float(rng.uniform(*_RADIUS[size]))
    cx, cy = _centre(rng, position, radius)
    return WorldObject(
        shape=shape, color=color, size=size, texture=texture, position=position, cx=float(cx), cy=float(cy),
        radius=radius, angle=float(rng.uniform(-15, 15)), pattern_angle=float(rng.choice([0.0, 45.0, 90.0, 135.0])),
        pattern_phase=float(rng.uniform(0, 1)),
    )


def _caption(o: WorldObject, rng: np.random.Generator, attribute_prob: float) -> tuple[str, tuple[str, ...]]:
    """The caption and the attributes it names besides the shape (each with probability ``attribute_prob``)."""
    named = tuple(a for a in NAMED_ATTRIBUTES if rng.uniform() < attribute_prob)
    order = ("size", "texture", "color") if rng.uniform() < 0.5 else ("size", "color", "texture")
    words = [getattr(o, a) for a in order if a in named] + [o.shape]
    phrase = f"{_article(words[0])} {' '.join(words)}"
    prefix = _PREFIXES[rng.integers(len(_PREFIXES))]
    if "position" not in named:
        return prefix + phrase, named
    where = POSITION_PHRASES[o.position][rng.integers(len(POSITION_PHRASES[o.position]))]
    if not prefix and rng.uniform() < 0.3:
        return f"{where}, {phrase}", named
    return f"{prefix}{phrase} {where}", named


def make_scene(seed: int, split: str, index: int, shape: str | None = None, attribute_prob: float = 0.75) -> Scene:
    """The scene (attributes, geometry and caption) of sample ``index`` of ``split`` for ``seed``; pure function.

    ``split`` is "train", "val" or "zeroshot"; zero-shot scenes hold an object of the given ``shape``.
    """
    rng = _rng(seed, split, index)
    base = float(rng.uniform(95, 195))
    tint = rng.uniform(-25, 25, size=3)
    background = tuple(int(np.clip(base + t, 0, 255)) for t in tint)
    gradient = (float(rng.uniform(-20, 20)), float(rng.uniform(-20, 20)))
    obj = _sample_object(rng, shape)
    caption, named = _caption(obj, rng, attribute_prob)
    return Scene(objects=[obj], background=background, gradient=gradient, caption=caption, named=named,
                 extra={"noise_seed": int(rng.integers(2**31))})


# ---------------------------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------------------------
def _rotate(points: list[tuple[float, float]], angle_deg: float) -> list[tuple[float, float]]:
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return [(x * c - y * s, x * s + y * c) for x, y in points]


def _polygon(shape: str, r: float) -> list[tuple[float, float]] | None:
    """Outline around (0, 0) with the y axis pointing down; None for the round shapes."""
    if shape == "square":
        h = 0.8 * r
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if shape == "diamond":
        return [(0, -r), (0.72 * r, 0), (0, r), (-0.72 * r, 0)]
    if shape == "triangle":
        pts = [(r * math.cos(math.radians(a)), r * math.sin(math.radians(a))) for a in (-90, 30, 150)]
        return [(x, y + 0.12 * r) for x, y in pts]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            a = math.radians(-90 + 36 * k)
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        return pts
    if shape == "cross":
        w, L = 0.32 * r, r
        return [(-w, -L), (w, -L), (w, -w), (L, -w), (L, w), (w, w), (w, L), (-w, L), (-w, w), (-L, w), (-L, -w),
                (-w, -w)]
    if shape == "heart":
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x * r / 16.5, -(y + 2.5) * r / 16.5))
        return pts
    return None


def _draw_shape(d: ImageDraw.ImageDraw, obj: WorldObject, canvas: int, fill, hole, border: int = 0) -> None:
    """Draw the object with ``fill`` (the ring's hole with ``hole``), eroded by ``border`` pixels."""
    cx, cy, r = obj.cx * canvas, obj.cy * canvas, obj.radius * canvas
    outline = {"outline": hole, "width": border} if border else {}
    if obj.shape in ("circle", "ring"):
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, **outline)
        if obj.shape == "ring":
            ri = 0.55 * r + border
            d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=hole)
    else:
        pts = _rotate(_polygon(obj.shape, r), obj.angle)
        d.polygon([(cx + x, cy + y) for x, y in pts], fill=fill, **outline)


def _shape_mask(obj: WorldObject, canvas: int, border: int = 0) -> Image.Image:
    """Mode-"L" [canvas, canvas] mask (0/255) of the object on a (supersampled) canvas, eroded by ``border``."""
    m = Image.new("L", (canvas, canvas), 0)
    _draw_shape(ImageDraw.Draw(m), obj, canvas, 255, 0, border)
    return m


def _grid(canvas: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:canvas, 0:canvas].astype(np.float32)
    return xs + 0.5, ys + 0.5


def _pattern_mask(obj: WorldObject, xs: np.ndarray, ys: np.ndarray, canvas: int, ss: int) -> np.ndarray:
    """Where a striped/dotted texture shows its contrast colour, on the grid ``xs, ys`` (canvas pixels)."""
    r_px = obj.radius * canvas / ss  # radius in output pixels
    if obj.texture == "striped":
        a = math.radians(obj.pattern_angle)
        period = max(5.0, 0.42 * r_px) * ss
        u = (xs * math.cos(a) + ys * math.sin(a)) / period + obj.pattern_phase
        return (u - np.floor(u)) < 0.45
    spacing = max(4.5, 0.5 * r_px) * ss  # dotted: a square grid of dots, aligned with the object centre
    dot = 0.3 * spacing
    off = 0.5 * obj.pattern_phase
    gx = (xs - obj.cx * canvas) / spacing + off
    gy = (ys - obj.cy * canvas) / spacing + off
    dx = gx - np.round(gx)
    dy = gy - np.round(gy)
    return dx * dx + dy * dy < (dot / spacing) ** 2


def contrast_color(color: str) -> tuple[int, int, int]:
    """Colour of the stripes/dots on an object of ``color``: white on dark colours, near-black on light ones."""
    r, g, b = COLORS[color]
    return (255, 255, 255) if 0.299 * r + 0.587 * g + 0.114 * b < 140 else (40, 40, 40)


_GRID_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _supersample(image_size: int) -> int:
    return 4 if image_size <= 96 else (2 if image_size <= 256 else 1)


def render_scene(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draw ``scene`` as an RGB ``image_size`` square (antialiased by supersampling; deterministic)."""
    ss = _supersample(image_size)
    canvas = image_size * ss
    if canvas not in _GRID_CACHE:
        _GRID_CACHE[canvas] = _grid(canvas)
    xs, ys = _GRID_CACHE[canvas]
    img = Image.new("RGB", (canvas, canvas), scene.background)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw_shape(draw, obj, canvas, COLORS[obj.color], scene.background)
        if obj.texture == "solid":
            continue
        # the texture stays inside a 1-pixel solid rim, so the silhouette is intact
        half = _BOUND * obj.radius * canvas + 2
        x0, y0 = max(int(obj.cx * canvas - half), 0), max(int(obj.cy * canvas - half), 0)
        x1, y1 = min(int(obj.cx * canvas + half) + 1, canvas), min(int(obj.cy * canvas + half) + 1, canvas)
        inner = np.asarray(_shape_mask(obj, canvas, border=ss))[y0:y1, x0:x1]
        pattern = _pattern_mask(obj, xs[y0:y1, x0:x1], ys[y0:y1, x0:x1], canvas, ss)
        mask = Image.fromarray(np.where(pattern, inner, 0).astype(np.uint8), mode="L")
        img.paste(contrast_color(obj.color), (x0, y0, x1, y1), mask)
    small = img.reduce(ss) if ss > 1 else img
    arr = np.asarray(small).astype(np.float32)
    # lighting gradient + light pixel noise over the whole picture
    lin = (np.arange(image_size, dtype=np.float32) / max(image_size - 1, 1)) - 0.5
    arr += (scene.gradient[0] * lin)[None, :, None] + (scene.gradient[1] * lin)[:, None, None]
    noise = np.random.default_rng(scene.extra["noise_seed"]).normal(0.0, 5.0, size=arr.shape).astype(np.float32)
    arr += noise
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def object_mask(obj: WorldObject, image_size: int) -> np.ndarray:
    """Boolean [image_size, image_size] mask of pixels fully covered by ``obj`` (for tests and analysis)."""
    ss = _supersample(image_size)
    m = np.asarray(_shape_mask(obj, image_size * ss)) > 127
    return m.reshape(image_size, ss, image_size, ss).all(axis=(1, 3))


# ---------------------------------------------------------------------------------------------------------------
# writing a world
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class WorldPaths:
    """Where a generated world lives. The CSV file paths are relative to ``data_root`` (== ``root``)."""

    root: str
    train_csv: str
    distill_csv: str
    val_csv: str
    zeroshot_dir: str | None
    data_root: str
    classnames: list[str]
    num_train: int
    num_distill: int
    num_val: int
    num_zeroshot: int
    image_size: int
    generated: bool  # False when an identical world was already there (no-op)
    seconds: float

    @property
    def chance(self) -> float:
        """Zero-shot top-1 of a uniform guess."""
        return 1.0 / len(self.classnames)

    def as_dict(self) -> dict:
        return asdict(self)

    def __getitem__(self, key: str):
        return getattr(self, key)


def _params(seed, num_train, num_distill, num_val, image_size, num_zeroshot_per_class, attribute_prob,
            jpeg_quality) -> dict:
    return {
        "version": WORLD_VERSION,
        "seed": int(seed),
        "num_train": int(num_train),
        "num_distill": int(num_distill),
        "num_val": int(num_val),
        "image_size": int(image_size),
        "num_zeroshot_per_class": int(num_zeroshot_per_class),
        "attribute_prob": float(attribute_prob),
        "jpeg_quality": int(jpeg_quality),
    }


def _save_jpeg(img: Image.Image, path: Path, quality: int) -> None:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
    path.write_bytes(buf.getvalue())


def _write_split(root: Path, split: str, n: int, params: dict) -> list[str]:
    """Images and ``<split>.csv``; returns the CSV lines (header first)."""
    img_dir = root / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    lines = ["filepath\ttitle"]
    for i in range(n):
        scene = make_scene(params["seed"], split, i, attribute_prob=params["attribute_prob"])
        rel = f"images/{split}/{i:06d}.jpg"
        _save_jpeg(render_scene(scene, params["image_size"]), root / rel, params["jpeg_quality"])
        lines.append(f"{rel}\t{scene.caption}")
    write_text(root / f"{split}.csv", "\n".join(lines) + "\n")
    return lines


def _write_zeroshot(root: Path, params: dict) -> None:
    """zeroshot/<SHAPES[c]>/NNNNNN.jpg is ``make_scene(seed, "zeroshot", NNNNNN, shape=SHAPES[c])``, with
    NNNNNN = c * num_zeroshot_per_class + j: an object of that shape, every other attribute random."""
    zs = root / "zeroshot"
    per_class = params["num_zeroshot_per_class"]
    for c, shape in enumerate(SHAPES):
        (zs / shape).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            i = c * per_class + j
            scene = make_scene(params["seed"], "zeroshot", i, shape=shape, attribute_prob=params["attribute_prob"])
            _save_jpeg(render_scene(scene, params["image_size"]), zs / shape / f"{i:06d}.jpg", params["jpeg_quality"])
    write_text(zs / "classnames.txt", "\n".join(SHAPES) + "\n")
    write_text(zs / "templates.txt", "\n".join(ZEROSHOT_TEMPLATES) + "\n")


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _remove_world(root: Path) -> None:
    """Delete only what a world generator writes (the marker first, so an interrupted delete is 'incomplete')."""
    (root / MARKER).unlink(missing_ok=True)
    for name in ("train.csv", "distill.csv", "val.csv"):
        (root / name).unlink(missing_ok=True)
    for name in ("images", "zeroshot"):
        if (root / name).exists():
            shutil.rmtree(root / name)


@contextlib.contextmanager
def _lock(root: Path):
    """Exclusive lock on ROOT/.world.lock so concurrent callers (e.g. every torchrun rank) generate only once."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: no locking
        yield
        return
    with open(root / ".world.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _paths(root: Path, params: dict, generated: bool, seconds: float) -> WorldPaths:
    n_zs = params["num_zeroshot_per_class"] * len(SHAPES)
    return WorldPaths(
        root=str(root), train_csv=str(root / "train.csv"), distill_csv=str(root / "distill.csv"),
        val_csv=str(root / "val.csv"), zeroshot_dir=str(root / "zeroshot") if n_zs else None, data_root=str(root),
        classnames=list(SHAPES), num_train=params["num_train"], num_distill=params["num_distill"],
        num_val=params["num_val"], num_zeroshot=n_zs, image_size=params["image_size"], generated=generated,
        seconds=seconds,
    )


def _complete(root: Path, params: dict) -> bool:
    if _read_marker(root) != params:
        return False
    needed = [root / "train.csv", root / "distill.csv", root / "val.csv"]
    if params["num_zeroshot_per_class"]:
        needed += [root / "zeroshot" / "classnames.txt", root / "zeroshot" / "templates.txt"]
    return all(p.is_file() for p in needed)


def generate_world(
    out_dir: str | os.PathLike,
    seed: int = 0,
    num_train: int = 6000,
    num_distill: int = 1000,
    num_val: int = 500,
    image_size: int = 32,
    num_zeroshot_per_class: int = 100,
    overwrite: bool = False,
    attribute_prob: float = 0.75,
    jpeg_quality: int = 90,
) -> WorldPaths:
    """Write the demo world under ``out_dir`` (see the module docstring for the layout) and return its paths.

    A no-op when ``out_dir`` already holds a complete world made with the same parameters, unless ``overwrite``.
    A world made with other parameters, or an incomplete one, is deleted (only the files a world consists of)
    and generated afresh. Safe to call from several processes at once (file lock).
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if min(num_train, num_distill, num_val, num_zeroshot_per_class) < 0:
        raise ValueError("sample counts must be >= 0")
    if num_distill > num_train:
        raise ValueError(f"num_distill ({num_distill}) must be <= num_train ({num_train}): the distillation set is "
                         f"the first rows of the training split")
    if not 0.0 <= attribute_prob <= 1.0:
        raise ValueError(f"attribute_prob must be in [0, 1], got {attribute_prob}")
    root = Path(out_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    params = _params(seed, num_train, num_distill, num_val, image_size, num_zeroshot_per_class, attribute_prob,
                     jpeg_quality)
    t0 = time.perf_counter()
    with _lock(root):
        if not overwrite and _complete(root, params):
            return _paths(root, params, generated=False, seconds=time.perf_counter() - t0)
        _remove_world(root)
        train_lines = _write_split(root, "train", num_train, params)
        write_text(root / "distill.csv", "\n".join(train_lines[:num_distill + 1]) + "\n")
        _write_split(root, "val", num_val, params)
        if num_zeroshot_per_class:
            _write_zeroshot(root, params)
        write_text(root / MARKER, json.dumps(params, indent=2, sort_keys=True) + "\n")
    return _paths(root, params, generated=True, seconds=time.perf_counter() - t0)


def run(argv: list[str] | None = None) -> int:
    defaults = {k: v.default for k, v in __import__("inspect").signature(generate_world).parameters.items()}
    p = argparse.ArgumentParser(prog="python -m training.demo.world",
                                description="Generate the embedded demo image-caption world (deterministic by seed).")
    p.add_argument("--out", required=True, help="world directory (also the --data-root of its CSVs)")
    p.add_argument("--seed", type=int, default=defaults["seed"])
    p.add_argument("--num-train", type=int, default=defaults["num_train"])
    p.add_argument("--num-distill", type=int, default=defaults["num_distill"],
                   help="rows of distill.csv (the first rows of train.csv)")
    p.add_argument("--num-val", type=int, default=defaults["num_val"])
    p.add_argument("--image-size", type=int, default=defaults["image_size"])
    p.add_argument("--num-zeroshot-per-class", type=int, default=defaults["num_zeroshot_per_class"])
    p.add_argument("--attribute-prob", type=float, default=defaults["attribute_prob"],
                   help="probability that a caption names each attribute besides the shape")
    p.add_argument("--overwrite", action="store_true", help="regenerate even if an identical world exists")
    args = p.parse_args(argv)
    try:
        w = generate_world(args.out, seed=args.seed, num_train=args.num_train, num_distill=args.num_distill,
                           num_val=args.num_val, image_size=args.image_size,
                           num_zeroshot_per_class=args.num_zeroshot_per_class, overwrite=args.overwrite,
                           attribute_prob=args.attribute_prob)
    except (ValueError, OSError) as e:  # bad parameters or an unwritable --out: one line, exit 2
        raise UsageError(first_line(e)) from e
    state = f"generated in {w.seconds:.1f}s" if w.generated else "up to date"
    print(f"world {w.root} ({state}): seed {args.seed}, {args.image_size}px, {w.num_train} train "
          f"({w.num_distill} in distill.csv), {w.num_val} val, {w.num_zeroshot} zero-shot ({len(w.classnames)} "
          f"classes) | --train-data {w.train_csv} --val-data {w.val_csv} --data-root {w.data_root} "
          f"--zeroshot-data {w.zeroshot_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())

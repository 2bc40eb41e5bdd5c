"""Shared helpers of the evaluation tests: a fake CLIP with crafted embeddings, and writers of every on-disk format.

Every image is a solid colour encoding an integer id (three base-12 digits, robust to JPEG); the fake model maps
the id to a row of `image_table`. The fake tokenizer maps a prompt to the class whose name it contains; the fake
model maps that class to a row of `text_table`. So tests decide exactly which class/caption ranks where.
"""

from __future__ import annotations

import io
import json
import os
import pickle

import numpy as np
import torch
from PIL import Image
from torch import nn


def id_color(i: int) -> tuple[int, int, int]:
    return 20 * (i % 12) + 10, 20 * ((i // 12) % 12) + 10, 20 * (i // 144) + 10


def id_image(i: int, size: int = 16) -> Image.Image:
    return Image.new("RGB", (size, size), id_color(i))


def id_array(ids, size: int) -> np.ndarray:
    """uint8 [N, size, size, 3] solid images of the ids."""
    return np.stack([np.full((size, size, 3), id_color(i), dtype=np.uint8) for i in ids])


class FakeTransform:
    """PIL -> [3, 4, 4] float tensor in [0, 1] (stable repr, so the feature-cache key is stable)."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        a = np.asarray(image.convert("RGB").resize((4, 4)), dtype=np.float32) / 255.0
        return torch.from_numpy(a).permute(2, 0, 1).contiguous()

    def __repr__(self) -> str:
        return "FakeTransform()"


class FakeTokenizer:
    """Text -> [[class index]]: exact name match first, else the longest class name contained in the text."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.exact = {}
        for i, n in enumerate(self.names):
            self.exact.setdefault(n, i)
        self.by_len = sorted(range(len(self.names)), key=lambda i: -len(self.names[i]))

    def index(self, text: str) -> int:
        if text in self.exact:
            return self.exact[text]
        for i in self.by_len:
            if self.names[i] in text:
                return i
        raise KeyError(f"fake tokenizer: no known name in {text!r}")

    def __call__(self, texts) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return torch.tensor([[self.index(t)] for t in texts], dtype=torch.long)


class FakeClip(nn.Module):
    def __init__(self, image_table, text_table):
        super().__init__()
        self.register_buffer("image_table", torch.as_tensor(image_table, dtype=torch.float32))
        self.register_buffer("text_table", torch.as_tensor(text_table, dtype=torch.float32))
        self.scale = nn.Parameter(torch.ones(()))  # a parameter, so the model has a dtype and a train/eval mode

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        rgb = (images[:, :, 1, 1] * 255.0).round()
        digits = ((rgb - 10) / 20).round().long().clamp(0, 11)
        ids = digits[:, 0] + 12 * digits[:, 1] + 144 * digits[:, 2]
        return self.image_table[ids] * self.scale

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_table[tokens[:, 0]]


def onehot(n: int, dim: int) -> torch.Tensor:
    return torch.eye(dim)[:n]


# ---- the crafted zero-shot example: 6 classes, 6 images with known ranks -------------------------------------------
# true class rank per image: 0 (hit), 1 (top-5 only), 0, 5 (miss), 0, tie with 5 others (ties count as misses)
CRAFT_CLASSES = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
CRAFT_LABELS = [0, 0, 1, 2, 2, 2]
CRAFT_TOP1, CRAFT_TOP5 = 3 / 6, 4 / 6
CRAFT_MPCR = (1 / 2 + 1 / 1 + 1 / 3) / 3  # classes 3..5 have no images and are left out


def craft_tables():
    e = torch.eye(6)
    images = torch.stack([
        e[0],
        0.6 * e[1] + 0.5 * e[0],
        e[1],
        e[0] + e[1] + e[3] + e[4] + e[5] + 0.5 * e[2],
        e[2],
        e[3],
    ])
    return images, e  # image id i -> images[i]; class c -> e[c]


def craft_model() -> tuple[FakeClip, FakeTokenizer]:
    images, texts = craft_tables()
    return FakeClip(images, texts), FakeTokenizer(CRAFT_CLASSES)


# ---- on-disk writers --------------------------------------------------------------------------------------------------

def write_folder(root, classnames, items, templates=("a photo of a {}.", "art of the {}."), ext=".jpg"):
    """items: [(class index, image id)]; class folders named f'{c:02d}_{name}' (sorted = class order)."""
    root = str(root)
    folders = [f"{c:02d}_{n.replace(' ', '_')}" for c, n in enumerate(classnames)]
    for f in folders:
        os.makedirs(os.path.join(root, f), exist_ok=True)
    for k, (c, i) in enumerate(items):
        id_image(i).save(os.path.join(root, folders[c], f"{k:04d}{ext}"), quality=95)
    with open(os.path.join(root, "classnames.txt"), "w") as f:
        f.write("\n".join(classnames) + "\n")
    if templates:
        with open(os.path.join(root, "templates.txt"), "w") as f:
            f.write("\n".join(templates) + "\n")
    return root


def write_cifar(root, ten: bool, test_items, train_items=None, classnames=None):
    """items: [(label, image id)] -> the python pickle batches of CIFAR-10 / CIFAR-100."""
    d = os.path.join(str(root), "cifar-10-batches-py" if ten else "cifar-100-python")
    os.makedirs(d, exist_ok=True)
    key = "labels" if ten else "fine_labels"

    def dump(name, items):
        arr = id_array([i for _, i in items], 32).transpose(0, 3, 1, 2).reshape(len(items), 3072)
        batch = {"data": arr, key: [y for y, _ in items], "filenames": [f"{k}.png" for k in range(len(items))]}
        if not ten:
            batch["coarse_labels"] = [0] * len(items)
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump(batch, f)

    dump("test_batch" if ten else "test", test_items)
    if train_items is not None:
        if ten:
            for b in range(5):
                dump(f"data_batch_{b + 1}", train_items[b::5])
        else:
            dump("train", train_items)
    if classnames is not None:
        meta = {"label_names": classnames} if ten else {"fine_label_names": classnames, "coarse_label_names": ["x"]}
        with open(os.path.join(d, "batches.meta" if ten else "meta"), "wb") as f:
            pickle.dump(meta, f)
    return str(root)


def write_stl10(root, test_items, train_items=None, pattern: np.ndarray | None = None):
    """items: [(label 0..9, image id)] -> stl10_binary/{split}_X.bin (column-major) and {split}_y.bin (1..10)."""
    d = os.path.join(str(root), "stl10_binary")
    os.makedirs(d, exist_ok=True)

    def dump(split, items, images=None):
        images = id_array([i for _, i in items], 96) if images is None else images
        images.transpose(0, 3, 2, 1).astype(np.uint8).tofile(os.path.join(d, f"{split}_X.bin"))
        np.array([y + 1 for y, _ in items], dtype=np.uint8).tofile(os.path.join(d, f"{split}_y.bin"))

    dump("test", test_items, pattern)
    if train_items is not None:
        dump("train", train_items)
    with open(os.path.join(d, "class_names.txt"), "w") as f:
        f.write("\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]) + "\n")
    return str(root)


def write_pets(root, breeds, test_items, trainval_items=None):
    """breeds: [(file prefix, species 1 cat / 2 dog)] in class-id order; items: [(class index, image id)]."""
    root = str(root)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    counter = [0]

    def dump(name, items):
        lines = []
        for c, i in items:
            counter[0] += 1
            prefix, species = breeds[c]
            stem = f"{prefix}_{counter[0]}"
            id_image(i).save(os.path.join(root, "images", f"{stem}.jpg"), quality=95)
            lines.append(f"{stem} {c + 1} {species} {c + 1}")
        with open(os.path.join(root, "annotations", name), "w") as f:
            f.write("\n".join(lines) + "\n")

    dump("test.txt", test_items)
    if trainval_items is not None:
        dump("trainval.txt", trainval_items)
    return root


def write_wds(root, classnames, shards, templates=("a photo of a {c}.",), split="test", exts=("webp", "png", "jpg")):
    """shards: list of [(label, image id)] lists -> CLIP_benchmark layout with .cls labels."""
    import webdataset as wds

    root = str(root)
    os.makedirs(os.path.join(root, split), exist_ok=True)
    with open(os.path.join(root, "classnames.txt"), "w") as f:
        f.write("\n".join(classnames) + "\n")
    with open(os.path.join(root, "zeroshot_classification_templates.txt"), "w") as f:
        f.write("\n".join(templates) + "\n")
    k = 0
    for s, items in enumerate(shards):
        with wds.TarWriter(os.path.join(root, split, f"{s}.tar")) as sink:
            for y, i in items:
                ext = exts[k % len(exts)]
                buf = io.BytesIO()
                id_image(i).save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext],
                                 **({"lossless": True} if ext == "webp" else {"quality": 95} if ext == "jpg" else {}))
                sink.write({"__key__": f"s{k:07d}", ext: buf.getvalue(), "cls": y})
                k += 1
    with open(os.path.join(root, split, "nshards.txt"), "w") as f:
        f.write(f"{len(shards)}\n")
    return root


# ---- the crafted retrieval example: 4 images x 5 captions (+ a 6th caption that must be dropped) -------------------
# caption j=0 of image i is e_i (rank 0); captions j=1..4 are e_{i+1} + 0.5 e_i (own image ranks 2nd)
RET_N = 4
RET_T2I = {1: 4 / 20, 5: 1.0, 10: 1.0}
RET_I2T = {1: 1.0, 5: 1.0, 10: 1.0}


def ret_caption(i: int, j: int) -> str:
    return f"caption {i} {j}"


def ret_model() -> tuple[FakeClip, FakeTokenizer]:
    e = torch.eye(8)
    names, rows = [], []
    for i in range(RET_N):
        for j in range(6):
            names.append(ret_caption(i, j))
            rows.append(e[i] if j == 0 else e[(i + 2) % RET_N + 4] if j == 5 else e[(i + 1) % RET_N] + 0.5 * e[i])
    return FakeClip(e[:RET_N], torch.stack(rows)), FakeTokenizer(names)


def write_karpathy(root, coco_style: bool = True, captions_per_image: int = 6):
    root = str(root)
    sub = "val2014" if coco_style else ""
    os.makedirs(os.path.join(root, sub), exist_ok=True)
    images = []
    for i in range(RET_N):
        name = f"img{i}.jpg"
        id_image(i).save(os.path.join(root, sub, name), quality=95)
        images.append({"filepath": sub, "filename": name, "split": "test",
                       "sentences": [{"raw": ret_caption(i, j), "tokens": []} for j in range(captions_per_image)]})
    images.append({"filepath": sub, "filename": "train_only.jpg", "split": "train", "sentences": []})
    path = os.path.join(root, "dataset_coco.json" if coco_style else "dataset_flickr30k.json")
    with open(path, "w") as f:
        json.dump({"images": images, "dataset": "coco" if coco_style else "flickr30k"}, f)
    return path


def write_retrieval_csv(root, name="val.csv"):
    """Tab-separated filepath/title rows; the 5 rows of an image share its filepath (relative to root)."""
    root = str(root)
    os.makedirs(os.path.join(root, "imgs"), exist_ok=True)
    lines = ["filepath\ttitle"]
    for j in range(5):
        for i in range(RET_N):
            if j == 0:
                id_image(i).save(os.path.join(root, "imgs", f"{i}.png"))
            lines.append(f"imgs/{i}.png\t{ret_caption(i, j)}")
    path = os.path.join(root, name)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path

"""Evaluation sets read straight from their standard on-disk formats (no torchvision download wrappers).

Classification (zero-shot, linear probe) kinds and what PATH points at:

| kind | PATH | labels |
|---|---|---|
| imagenet1k | val folder of wnid sub-folders (or its parent holding `val/`, `train/`) | index in the sorted 1000-wnid list |
| imagenet-sketch | wnid sub-folders (or `sketch/`) | as imagenet1k |
| imagenetv2 | release folder with sub-folders `0`..`999` | `int(folder)` (NOT the text-sorted position) |
| imagenet-r, imagenet-a | 200 wnid sub-folders | position in the subset; logits restricted to those classes |
| cifar10, cifar100 | `cifar-10-batches-py/` / `cifar-100-python/` or their parent | python pickle batches |
| stl10 | `stl10_binary/` or its parent | `test_y.bin` 1..10 -> 0..9 |
| pets, pets-coarse | Oxford-IIIT Pet root (`annotations/test.txt`, `images/`) | 37 breeds / cat, dog |
| folder | class sub-folders + `classnames.txt` (+ `templates.txt`) | sorted folder order |
| wds | CLIP_benchmark WebDataset (`classnames.txt`, `zeroshot_classification_templates.txt`, `test/*.tar`) | `.cls` |

A bare PATH (or a NAME that is not a kind) is detected only when it matches a benchmark exactly: ImageNet-V2's
folders `0`..`999`, the 1000 ImageNet-1k wnids, the 200 wnids of ImageNet-R or of ImageNet-A, or a folder with
`classnames.txt`; anything else is refused with what to add. A detected kind is reported (`DatasetSpec.detected`).
A named kind with only part of its classes is read, and `ClassificationSet.notes` says so.

Retrieval kinds: `coco`, `flickr30k` (Karpathy JSON `dataset_coco.json` / `dataset_flickr30k.json`, split `test`,
5 captions per image) and `csv` (tab-separated `filepath<TAB>title`, rows sharing a filepath are one image).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..errors import DatasetError
from . import templates as T

IMG_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WNID_RE = re.compile(r"^n\d{8}$")

CLASSIFICATION_KINDS = ("imagenet1k", "imagenetv2", "imagenet-r", "imagenet-a", "imagenet-sketch", "cifar10",
                        "cifar100", "stl10", "pets", "pets-coarse", "folder", "wds")
RETRIEVAL_KINDS = ("coco", "flickr30k", "karpathy", "csv")
KINDS = CLASSIFICATION_KINDS + RETRIEVAL_KINDS
DISTRIBUTION_SHIFT_KINDS = ("imagenetv2", "imagenet-r", "imagenet-a", "imagenet-sketch")

ALIASES = {
    "imagenet": "imagenet1k", "imagenet-1k": "imagenet1k", "in1k": "imagenet1k",
    "imagenet-v2": "imagenetv2", "imagenetr": "imagenet-r", "imagenet-rendition": "imagenet-r",
    "imageneta": "imagenet-a", "imagenet-adversarial": "imagenet-a", "imagenetsketch": "imagenet-sketch",
    "cifar-10": "cifar10", "cifar-100": "cifar100", "stl-10": "stl10",
    "oxford-pets": "pets", "oxford-iiit-pet": "pets", "pet": "pets", "pets-fine": "pets",
    "mscoco": "coco", "mscoco-captions": "coco", "coco-5k": "coco", "flickr": "flickr30k", "flickr-1k": "flickr30k",
    "imagefolder": "folder", "webdataset": "wds",
}


def canonical_kind(name: str) -> str | None:
    key = name.strip().lower().replace("_", "-")
    if key.startswith("wds/"):
        return "wds"
    key = ALIASES.get(key, key)
    return key if key in KINDS else None


# ---- image sources -------------------------------------------------------------------------------------------

def load_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


class FileImages:
    """Map-style source of (PIL image, label) from image files."""

    def __init__(self, paths: list[str], labels: list[int]):
        self.paths, self.labels = list(paths), [int(v) for v in labels]

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> tuple[Image.Image, int]:
        return load_rgb(self.paths[i]), self.labels[i]

    def describe(self) -> str:
        return f"{len(self)} image files"


class ArrayImages:
    """Map-style source over an uint8 array [N, H, W, 3] (CIFAR, STL-10)."""

    def __init__(self, array: np.ndarray, labels):
        self.array, self.labels = array, [int(v) for v in labels]

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(np.ascontiguousarray(self.array[i])), self.labels[i]

    def describe(self) -> str:
        return f"{len(self)} arrays {tuple(self.array.shape[1:])}"


class WdsImages:
    """Iterable source over WebDataset shards with `.cls` labels; samples are keyed (shard index, position).

    `iterate(part, nparts)` yields this part's samples only: whole shards when there are at least as many shards as
    parts (no wasted reads), otherwise every nparts-th sample (undecoded samples of other parts are skipped cheaply).
    """

    IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")

    def __init__(self, shards: list[str]):
        self.shards = list(shards)

    def describe(self) -> str:
        return f"{len(self.shards)} WebDataset shard(s)"

    def _samples(self, url: str) -> Iterator[dict]:
        import webdataset as wds

        yield from wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples())

    def iterate(self, part: int, nparts: int) -> Iterator[tuple[int, Image.Image, int]]:
        by_shard = len(self.shards) >= nparts
        counter = 0
        for s, url in enumerate(self.shards):
            if by_shard and s % nparts != part:
                continue
            for pos, sample in enumerate(self._samples(url)):
                if not by_shard:
                    counter += 1
                    if (counter - 1) % nparts != part:
                        continue
                yield (s << 32) | pos, *self.decode(sample)

    @classmethod
    def decode(cls, sample: dict) -> tuple[Image.Image, int]:
        data = next((sample[k] for k in cls.IMAGE_KEYS if k in sample), None)
        if data is None or "cls" not in sample:
            raise DatasetError(f"WebDataset sample {sample.get('__key__')} has no image ({'/'.join(cls.IMAGE_KEYS)}) "
                               f"or no .cls label")
        label = sample["cls"]
        label = int(label.decode().strip() if isinstance(label, bytes) else label)
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB"), label


# ---- dataset descriptions ------------------------------------------------------------------------------------

@dataclass
class ClassificationSet:
    name: str                      # the user's label for the set, e.g. "cifar10" or "my-demo"
    kind: str
    path: str
    split: str
    source: FileImages | ArrayImages | WdsImages
    classnames: list[str]
    templates: list
    class_index: list[int] | None = None   # for 200-class ImageNet subsets: their indices among the 1000 classes
    notes: list[str] = field(default_factory=list)  # what the caller must say out loud (a partial class set, ...)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


@dataclass
class RetrievalSet:
    name: str
    kind: str
    path: str
    images: list[str]
    captions: list[list[str]]
    texts: list[str] = field(init=False)
    text_to_image: list[int] = field(init=False)

    def __post_init__(self):
        self.texts = [c for caps in self.captions for c in caps]
        self.text_to_image = [i for i, caps in enumerate(self.captions) for _ in caps]

    @property
    def source(self) -> FileImages:
        return FileImages(self.images, [0] * len(self.images))


@dataclass
class DatasetSpec:
    name: str   # label used in metric names and result files
    kind: str
    path: str
    root: str | None = None  # image root of a retrieval file (`NAME=FILE::ROOT`), else --data-root
    detected: str | None = None  # why the kind was detected from PATH (None when NAME gave it); to be logged

    @property
    def is_retrieval(self) -> bool:
        return self.kind in RETRIEVAL_KINDS


# ---- spec parsing and format detection -------------------------------------------------------------------------

def _subdirs(path: str) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return []


def _is_wnid_dir(path: str) -> bool:
    subs = _subdirs(path)
    return bool(subs) and all(WNID_RE.match(s) for s in subs)


def _first_existing(*paths: str) -> str | None:
    return next((p for p in paths if os.path.exists(p)), None)


ADD_CLASSNAMES = "add classnames.txt with one class name per line, in sorted folder order, or pass KIND=PATH"


def _add_classnames(folders: list[str]) -> str:
    """ADD_CLASSNAMES, plus the order spelled out when numbered folders sort as text differently than as numbers."""
    if all(f.isdigit() for f in folders) and folders != sorted(folders, key=int):
        shown = ", ".join(folders[:4])
        return ADD_CLASSNAMES.replace("in sorted folder order", f"in sorted folder order (as text: {shown}, ...)")
    return ADD_CLASSNAMES


_IMAGENET_SUBDIRS = ("", "val", "sketch", "imagenet-r", "imagenet-a")


def _span(folders: list[str]) -> str:
    """'0..9' for numbered folders, else the first and last name."""
    if all(f.isdigit() for f in folders):
        nums = sorted(int(f) for f in folders)
        return f"{nums[0]}..{nums[-1]}" if len(nums) > 1 else str(nums[0])
    return f"{folders[0]} .. {folders[-1]}" if len(folders) > 1 else folders[0]


def _wnid_benchmarks() -> list[tuple[str, str, set[str]]]:
    return [("imagenet1k", "ImageNet-1k", set(T.imagenet_wnids())),
            ("imagenet-r", "ImageNet-R", set(T.imagenet_subset_wnids("imagenet-r"))),
            ("imagenet-a", "ImageNet-A", set(T.imagenet_subset_wnids("imagenet-a")))]


def detect(path: str) -> tuple[str, str]:
    """(kind, why) of the format at `path`. Class folders are taken for a benchmark only when they are exactly its
    classes; otherwise DatasetError says what to add (a guess could score the wrong benchmark without a word)."""
    j = os.path.join
    if os.path.isfile(path):
        low = path.lower()
        if low.endswith(".json"):
            base = os.path.basename(low)
            kind = "coco" if "coco" in base else "flickr30k" if "flickr" in base else "karpathy"
            return kind, f"a Karpathy split JSON{'' if kind == 'karpathy' else f' named after {kind}'}"
        if low.endswith((".csv", ".tsv")):
            return "csv", "a .csv/.tsv caption file"
        raise DatasetError(f"cannot detect the format of {path} (known dataset names: {', '.join(KINDS)})")
    if not os.path.isdir(path):
        raise DatasetError(f"cannot detect the format of {path}: not a file or folder")
    if os.path.isfile(j(path, "zeroshot_classification_templates.txt")) or (
            os.path.isfile(j(path, "classnames.txt")) and _wds_shards(path, "test", must=False)):
        return "wds", "CLIP_benchmark WebDataset files (classnames.txt + .tar shards)"
    if os.path.isfile(j(path, "classnames.txt")) or os.path.isfile(j(path, "zeroshot", "classnames.txt")):
        return "folder", "class folders with classnames.txt"
    if _first_existing(j(path, "cifar-10-batches-py"), j(path, "batches.meta"), j(path, "test_batch")):
        return "cifar10", "CIFAR-10 python batches"
    if _first_existing(j(path, "cifar-100-python"), j(path, "meta")) and _first_existing(
            j(path, "cifar-100-python"), j(path, "test")):
        return "cifar100", "CIFAR-100 python batches"
    if _first_existing(j(path, "stl10_binary"), j(path, "test_X.bin")):
        return "stl10", "STL-10 binary files"
    if os.path.isfile(j(path, "annotations", "test.txt")):
        return "pets", "Oxford-IIIT Pet annotations/test.txt"
    subs = _subdirs(path)
    if subs and all(s.isdigit() for s in subs):
        if set(subs) == {str(i) for i in range(1000)}:
            return "imagenetv2", "1000 class folders 0..999 (ImageNet-V2 layout)"
        raise DatasetError(f"{path}: {len(subs)} numbered class folders ({_span(subs)}) and no classnames.txt, so "
                           f"the classes are unknown (ImageNet-V2 has the 1000 folders 0..999): {_add_classnames(subs)} "
                           f"(e.g. imagenetv2=PATH for part of ImageNet-V2)")
    benchmarks = None  # the shipped wnid lists, read once and only for wnid folders
    for sub in _IMAGENET_SUBDIRS:
        d = j(path, sub) if sub else path
        folders = _subdirs(d)
        if not folders or not all(WNID_RE.match(f) for f in folders):
            continue
        got = set(folders)
        benchmarks = benchmarks or _wnid_benchmarks()
        for kind, label, wnids in benchmarks:
            if got == wnids:
                if kind == "imagenet1k" and sub == "sketch":
                    return "imagenet-sketch", f"the 1000 ImageNet wnid class folders in {d}"
                same = " (ImageNet-Sketch has the same folders: pass imagenet-sketch=PATH)" if kind == "imagenet1k" \
                    else ""
                return kind, f"the {len(wnids)} wnid class folders of {label}{same}"
        best = max(benchmarks, key=lambda b: len(got & b[2]))
        raise DatasetError(f"{d}: {len(folders)} wnid class folders, not exactly the classes of ImageNet-1k (1000) or "
                           f"of ImageNet-R / ImageNet-A (200 each; closest: {len(got & best[2])} of {best[1]}'s "
                           f"{len(best[2])}): {ADD_CLASSNAMES} (imagenet1k, imagenet-sketch, imagenet-r, imagenet-a)")
    if subs:
        raise DatasetError(f"{path}: {len(subs)} class folders and no classnames.txt: {ADD_CLASSNAMES} (folder=PATH "
                           f"takes the class names from the folder names)")
    raise DatasetError(f"cannot detect the format of {path} (known dataset names: {', '.join(KINDS)})")


def detect_kind(path: str) -> str | None:
    """The kind `detect` finds at `path`, or None when nothing matches exactly."""
    try:
        return detect(path)[0]
    except DatasetError:
        return None


def parse_dataset_specs(text: str | list[str] | None) -> list[DatasetSpec]:
    """`NAME=PATH,...` -> specs. NAME is a kind (imagenet1k, cifar10, coco, ...) or a free label whose format is
    detected from PATH; a bare PATH is detected too. A retrieval file may name its image root: `coco=JSON::ROOT`.
    Raises DatasetError for a missing path or an unknown format."""
    items = text if isinstance(text, list) else [t for t in (text or "").split(",")]
    specs: list[DatasetSpec] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, path = item.split("=", 1) if "=" in item else ("", item)
        name, path = name.strip(), path.strip()
        path, root = (p.strip() for p in path.split("::", 1)) if "::" in path else (path, None)
        path = os.path.expanduser(path)
        if root is not None and not os.path.isdir(os.path.expanduser(root)):
            raise DatasetError(f"image root not found: {root}" + (f" (for {name})" if name else ""))
        if not os.path.exists(path):
            raise DatasetError(f"dataset path not found: {path}" + (f" (for {name})" if name else ""))
        kind = canonical_kind(name) if name else None
        detected = None
        if kind is None:
            try:
                kind, detected = detect(path)
            except DatasetError as exc:
                raise DatasetError(f"unknown dataset '{name}', and {exc}" if name else str(exc)) from None
        label = name or kind
        taken = {s.name for s in specs}
        base, n = label, 2
        while label in taken:
            label, n = f"{base}-{n}", n + 1
        specs.append(DatasetSpec(label, kind, path, os.path.expanduser(root) if root else None, detected))
    return specs


# ---- ImageNet family ---------------------------------------------------------------------------------------------

def list_images(folder: str) -> list[str]:
    """Every image file under `folder`, recursively, in sorted order (folders and files)."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        out.extend(os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMG_EXTS))
    return out


def _folder_samples(path: str, folders: list[str], labels: list[int]) -> FileImages:
    paths, ys = [], []
    for folder, y in zip(folders, labels):
        files = list_images(os.path.join(path, folder))
        paths += files
        ys += [y] * len(files)
    if not paths:
        raise DatasetError(f"no images under {path}")
    return FileImages(paths, ys)


def _imagenet_split_dir(path: str, split: str) -> str | None:
    if split == "test":
        if _is_wnid_dir(path):
            return path
        for sub in ("val", "sketch", "imagenet-r", "imagenet-a"):
            if _is_wnid_dir(os.path.join(path, sub)):
                return os.path.join(path, sub)
        return None
    for cand in (os.path.join(path, "train"), os.path.join(os.path.dirname(os.path.abspath(path)), "train")):
        if os.path.abspath(cand) != os.path.abspath(path) and _is_wnid_dir(cand):
            return cand
    return None


def imagenet_index_map(folder_wnids: list[str], wnids: list[str]) -> list[int]:
    """Indices of `folder_wnids` among the 1000 sorted ImageNet wnids (the 1000->200 map of ImageNet-R/A)."""
    pos = {w: i for i, w in enumerate(wnids)}
    missing = [w for w in folder_wnids if w not in pos]
    if missing:
        raise DatasetError(f"{len(missing)} folder(s) are not ImageNet-1k wnids, e.g. {missing[0]}")
    return [pos[w] for w in folder_wnids]


def _load_imagenet(spec: DatasetSpec, split: str, wnids: list[str] | None) -> ClassificationSet:
    wnids = wnids or T.imagenet_wnids()
    names = T.imagenet_classnames()
    if len(wnids) != len(names):
        raise DatasetError(f"the wnid list has {len(wnids)} entries, ImageNet has {len(names)} classes")
    if spec.kind == "imagenetv2":
        if split != "test":
            raise DatasetError("ImageNet-V2 has no train split")
        # Folders are "0".."999": the label is the folder NAME as an integer, not its (text-sorted) position.
        folders = _subdirs(spec.path)
        if not folders or not all(f.isdigit() and int(f) < len(names) for f in folders):
            raise DatasetError(f"{spec.path}: expected ImageNet-V2 class folders 0..999")
        source = _folder_samples(spec.path, folders, [int(f) for f in folders])
        notes = [] if len(folders) == len(names) else [
            f"{spec.path}: {len(folders)} of ImageNet-V2's {len(names)} class folders ({_span(folders)}); scored "
            f"{len(names)}-way over these, not comparable to the full benchmark"]
        return ClassificationSet(spec.name, spec.kind, spec.path, split, source, names, list(T.OPENAI_IMAGENET_TEMPLATES),
                                 notes=notes)
    d = _imagenet_split_dir(spec.path, split)
    if d is None:
        raise DatasetError(f"{spec.path}: no ImageNet-style {split} folder of wnid sub-folders")
    folders = _subdirs(d)
    index = imagenet_index_map(folders, wnids)
    if spec.kind in ("imagenet-r", "imagenet-a"):
        # Subset: labels are positions in the subset and the classifier holds only these classes, which is exactly
        # "restrict the 1000-way logits to the subset's columns".
        source = _folder_samples(d, folders, list(range(len(folders))))
        subsets = {kind: (name, wnids) for kind, name, wnids in _wnid_benchmarks() if kind != "imagenet1k"}
        known = {k: wnids for k, (_, wnids) in subsets.items()}
        label = {k: name for k, (name, _) in subsets.items()}
        notes = []
        if set(folders) != known[spec.kind]:
            other = next((label[k] for k in known if k != spec.kind and set(folders) == known[k]), None)
            outside = len(set(folders) - known[spec.kind])
            notes.append(f"{d}: {len(folders)} wnid folders, not {label[spec.kind]}'s {len(known[spec.kind])} classes "
                         f"({outside} outside it{f'; they are exactly {other} classes' if other else ''}); the "
                         f"classifier holds only these {len(folders)} classes, not comparable to the benchmark")
        return ClassificationSet(spec.name, spec.kind, spec.path, split, source, [names[i] for i in index],
                                 list(T.OPENAI_IMAGENET_TEMPLATES), class_index=index, notes=notes)
    source = _folder_samples(d, folders, index)
    notes = [] if len(set(index)) == len(names) else [
        f"{d}: {len(folders)} of the {len(names)} ImageNet class folders; scored {len(names)}-way over these, not "
        f"comparable to the full benchmark"]
    return ClassificationSet(spec.name, spec.kind, spec.path, split, source, names, list(T.OPENAI_IMAGENET_TEMPLATES),
                             notes=notes)


# ---- CIFAR, STL-10, Pets -----------------------------------------------------------------------------------------

def _unpickle(path: str) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _cifar_dir(path: str, sub: str) -> str:
    return os.path.join(path, sub) if os.path.isdir(os.path.join(path, sub)) else path


def _load_cifar(spec: DatasetSpec, split: str) -> ClassificationSet:
    ten = spec.kind == "cifar10"
    d = _cifar_dir(spec.path, "cifar-10-batches-py" if ten else "cifar-100-python")
    if ten:
        files = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
        meta_file, meta_key, label_key, default = "batches.meta", "label_names", "labels", T.CIFAR10_CLASSNAMES
    else:
        files = ["test" if split == "test" else "train"]
        meta_file, meta_key, label_key, default = "meta", "fine_label_names", "fine_labels", T.CIFAR100_CLASSNAMES
    paths = [os.path.join(d, f) for f in files]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetError(f"CIFAR batch file not found: {missing[0]}")
    data, labels = [], []
    for p in paths:
        batch = _unpickle(p)
        data.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += list(batch[label_key])
    classnames = list(default)
    meta_path = os.path.join(d, meta_file)
    if os.path.isfile(meta_path):
        classnames = [n.replace("_", " ") for n in _unpickle(meta_path)[meta_key]]
    return ClassificationSet(spec.name, spec.kind, spec.path, split, ArrayImages(np.concatenate(data), labels),
                             classnames, list(T.CIFAR_TEMPLATES))


def _load_stl10(spec: DatasetSpec, split: str) -> ClassificationSet:
    d = _cifar_dir(spec.path, "stl10_binary")
    xp, yp = os.path.join(d, f"{split}_X.bin"), os.path.join(d, f"{split}_y.bin")
    for p in (xp, yp):
        if not os.path.isfile(p):
            raise DatasetError(f"STL-10 file not found: {p}")
    raw = np.fromfile(xp, dtype=np.uint8)
    if raw.size % (3 * 96 * 96):
        raise DatasetError(f"{xp}: size is not a multiple of 3x96x96")
    # Each image is stored channel-major and column-major: [C, W, H] -> [H, W, C].
    images = raw.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)
    labels = np.fromfile(yp, dtype=np.uint8).astype(np.int64) - 1  # 1..10 on disk
    if len(labels) != len(images) or labels.min(initial=0) < 0:
        raise DatasetError(f"{yp}: expected one label in 1..10 per image of {xp}")
    classnames = list(T.STL10_CLASSNAMES)
    names_file = os.path.join(d, "class_names.txt")
    if os.path.isfile(names_file):
        classnames = T.read_classnames(names_file)
    return ClassificationSet(spec.name, spec.kind, spec.path, split, ArrayImages(images, labels), classnames,
                             list(T.STL10_TEMPLATES))


def _read_pets_list(path: str) -> list[tuple[str, int, int]]:
    rows = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            rows.append((parts[0], int(parts[1]), int(parts[2])))  # image, CLASS-ID 1..37, SPECIES 1 cat 2 dog
    return rows


def _load_pets(spec: DatasetSpec, split: str) -> ClassificationSet:
    ann = os.path.join(spec.path, "annotations")
    list_file = os.path.join(ann, "test.txt" if split == "test" else "trainval.txt")
    if not os.path.isfile(list_file):
        raise DatasetError(f"Oxford-IIIT Pet list not found: {list_file}")
    rows = _read_pets_list(list_file)
    paths = [os.path.join(spec.path, "images", f"{name}.jpg") for name, _, _ in rows]
    missing = next((p for p in paths if not os.path.isfile(p)), None)
    if missing:
        raise DatasetError(f"Oxford-IIIT Pet image not found: {missing}")
    if spec.kind == "pets-coarse":
        labels, classnames = [sp - 1 for _, _, sp in rows], list(T.PETS_COARSE_CLASSNAMES)
    else:
        labels = [c - 1 for _, c, _ in rows]
        classnames = list(T.PETS_CLASSNAMES)
        # Names from the file prefixes ("american_pit_bull_terrier_12" -> "american pit bull terrier").
        for name, c, _ in rows + [r for f in ("trainval.txt", "test.txt", "list.txt")
                                  if os.path.isfile(os.path.join(ann, f)) for r in _read_pets_list(os.path.join(ann, f))]:
            if 1 <= c <= len(classnames):
                classnames[c - 1] = name.rsplit("_", 1)[0].replace("_", " ")
    return ClassificationSet(spec.name, spec.kind, spec.path, split, FileImages(paths, labels), classnames,
                             list(T.PETS_TEMPLATES))


# ---- image folder with classnames.txt, and CLIP_benchmark WebDataset ------------------------------------------------

def _load_folder(spec: DatasetSpec, split: str) -> ClassificationSet:
    root = spec.path
    if not os.path.isfile(os.path.join(root, "classnames.txt")) and os.path.isfile(
            os.path.join(root, "zeroshot", "classnames.txt")):
        root = os.path.join(root, "zeroshot")  # the embedded demo world's root
    split_dirs = {"train": ("train",), "test": ("test", "val")}[split]
    d = next((os.path.join(root, s) for s in split_dirs if os.path.isdir(os.path.join(root, s))), None)
    if d is None:
        if split == "train":
            raise DatasetError(f"{spec.path}: no train/ folder")
        d = root
    folders = [f for f in _subdirs(d) if f not in ("train", "test", "val")]
    if not folders:
        raise DatasetError(f"{d}: no class sub-folders")
    names_file = _first_existing(os.path.join(d, "classnames.txt"), os.path.join(root, "classnames.txt"))
    notes = []
    if names_file:
        classnames = T.read_classnames(names_file)
        if all(f.isdigit() for f in folders) and folders != sorted(folders, key=int):
            notes.append(f"{d}: labels follow the text order of the numbered folders ({', '.join(folders[:4])}, ...): "
                         f"line k of {os.path.basename(names_file)} names the k-th of them")
    elif all(f.isdigit() or WNID_RE.match(f) for f in folders):  # ids, not names: prompts of "a photo of a 3."
        raise DatasetError(f"{d}: class folders {_span(folders)} and no classnames.txt, so the classes are unknown: "
                           f"{_add_classnames(folders)} (imagenetv2, imagenet1k, imagenet-r, ... for those benchmarks)")
    else:
        classnames = [f.replace("_", " ") for f in folders]
        notes.append(f"{d}: no classnames.txt, class names from the folder names ({', '.join(classnames[:3])}"
                     f"{', ...' if len(classnames) > 3 else ''})")
    if len(classnames) != len(folders):
        raise DatasetError(f"{names_file}: {len(classnames)} class names for {len(folders)} class folders in {d}")
    tpl_file = _first_existing(os.path.join(d, "templates.txt"), os.path.join(root, "templates.txt"))
    templates = T.read_templates(tpl_file) if tpl_file else list(T.OPENAI_IMAGENET_TEMPLATES)
    source = _folder_samples(d, folders, list(range(len(folders))))
    return ClassificationSet(spec.name, spec.kind, spec.path, split, source, classnames, templates, notes=notes)


def _wds_shards(path: str, split: str, must: bool = True) -> list[str]:
    d = os.path.join(path, split)
    shards: list[str] = []
    if os.path.isdir(d):
        nfile = os.path.join(d, "nshards.txt")
        if os.path.isfile(nfile):
            with open(nfile) as f:
                n = int(f.read().strip() or 0)
            shards = [os.path.join(d, f"{i}.tar") for i in range(n)]
        else:
            tars = [f for f in os.listdir(d) if f.endswith(".tar")]
            shards = [os.path.join(d, f) for f in sorted(tars, key=lambda f: (len(f), f))]
    elif split == "test":
        tars = [f for f in os.listdir(path) if f.endswith(".tar")] if os.path.isdir(path) else []
        shards = [os.path.join(path, f) for f in sorted(tars, key=lambda f: (len(f), f))]
    if must and not shards:
        raise DatasetError(f"{path}: no {split} .tar shards")
    if must:
        missing = next((s for s in shards if not os.path.isfile(s)), None)
        if missing:
            raise DatasetError(f"WebDataset shard not found: {missing}")
    return shards


def _load_wds(spec: DatasetSpec, split: str) -> ClassificationSet:
    names_file = os.path.join(spec.path, "classnames.txt")
    if not os.path.isfile(names_file):
        raise DatasetError(f"{names_file} not found")
    tpl_file = os.path.join(spec.path, "zeroshot_classification_templates.txt")
    templates = T.read_templates(tpl_file) if os.path.isfile(tpl_file) else list(T.OPENAI_IMAGENET_TEMPLATES)
    return ClassificationSet(spec.name, spec.kind, spec.path, split, WdsImages(_wds_shards(spec.path, split)),
                             T.read_classnames(names_file), templates)


# ---- entry points ----------------------------------------------------------------------------------------------------

def has_train_split(spec: DatasetSpec) -> bool:
    j = os.path.join
    k, p = spec.kind, spec.path
    if k == "cifar10":
        return os.path.isfile(j(_cifar_dir(p, "cifar-10-batches-py"), "data_batch_1"))
    if k == "cifar100":
        return os.path.isfile(j(_cifar_dir(p, "cifar-100-python"), "train"))
    if k == "stl10":
        return os.path.isfile(j(_cifar_dir(p, "stl10_binary"), "train_X.bin"))
    if k in ("pets", "pets-coarse"):
        return os.path.isfile(j(p, "annotations", "trainval.txt"))
    if k in ("imagenet1k", "imagenet-sketch"):
        return _imagenet_split_dir(p, "train") is not None
    if k == "folder":
        return os.path.isdir(j(p, "train")) or os.path.isdir(j(p, "zeroshot", "train"))
    if k == "wds":
        return bool(_wds_shards(p, "train", must=False)) and os.path.isdir(j(p, "train"))
    return False


def load_classification(spec: DatasetSpec, split: str = "test", templates: str = "auto",
                        wnids: list[str] | None = None) -> ClassificationSet:
    """Read a classification set. `templates`: auto (the dataset's own), openai, simple, or a templates file."""
    if spec.kind not in CLASSIFICATION_KINDS:
        raise DatasetError(f"{spec.name} ({spec.kind}) is not a classification set")
    try:
        if spec.kind.startswith("imagenet"):
            ds = _load_imagenet(spec, split, wnids)
        elif spec.kind in ("cifar10", "cifar100"):
            ds = _load_cifar(spec, split)
        elif spec.kind == "stl10":
            ds = _load_stl10(spec, split)
        elif spec.kind in ("pets", "pets-coarse"):
            ds = _load_pets(spec, split)
        elif spec.kind == "folder":
            ds = _load_folder(spec, split)
        else:
            ds = _load_wds(spec, split)
    except DatasetError:
        raise
    except (OSError, ValueError, KeyError, pickle.UnpicklingError) as exc:
        raise DatasetError(f"cannot read {spec.kind} at {spec.path}: {exc}") from exc
    if templates and templates != "auto":
        ds.templates = resolve_templates(templates)
    return ds


def resolve_templates(value: str) -> list:
    if value in T.TEMPLATE_SETS:
        return list(T.TEMPLATE_SETS[value])
    if os.path.isfile(value):
        return T.read_templates(value)
    raise DatasetError(f"--templates: not a template set ({', '.join(T.TEMPLATE_SETS)}) or a file: {value}")


def _karpathy(spec: DatasetSpec, data_root: str | None, max_captions: int) -> RetrievalSet:
    try:
        with open(spec.path) as f:
            meta = json.load(f)
        entries = [im for im in meta["images"] if im.get("split") == "test"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"cannot read Karpathy split JSON {spec.path}: {exc}") from exc
    if not entries:
        raise DatasetError(f"{spec.path}: no images with split == 'test'")
    root = data_root or os.path.dirname(os.path.abspath(spec.path))
    images, captions = [], []
    for im in entries:
        cands = [os.path.join(root, im.get("filepath", ""), im["filename"]), os.path.join(root, im["filename"]),
                 os.path.join(root, "images", im["filename"]), os.path.join(root, "flickr30k-images", im["filename"])]
        path = _first_existing(*cands)
        if path is None:
            raise DatasetError(f"image not found: {cands[0]} (set --data-root to the image root)")
        caps = [s["raw"].strip() for s in im["sentences"]][:max_captions]
        if not caps:
            raise DatasetError(f"{spec.path}: image {im['filename']} has no captions")
        images.append(path)
        captions.append(caps)
    return RetrievalSet(spec.name, spec.kind, spec.path, images, captions)


def _csv(spec: DatasetSpec, data_root: str | None, img_key: str, caption_key: str, sep: str) -> RetrievalSet:
    import pandas as pd

    try:
        df = pd.read_csv(spec.path, sep=sep, dtype=str, keep_default_na=False)
        paths, caps = df[img_key].tolist(), df[caption_key].tolist()
    except (OSError, ValueError, KeyError) as exc:
        raise DatasetError(f"cannot read CSV {spec.path} (keys {img_key!r}, {caption_key!r}): {exc}") from exc
    root = data_root if data_root is not None else os.path.dirname(os.path.abspath(spec.path))
    grouped: dict[str, list[str]] = {}
    for p, c in zip(paths, caps):
        grouped.setdefault(p, []).append(str(c))
    images = [p if os.path.isabs(p) else os.path.join(root, p) for p in grouped]
    missing = next((p for p in images if not os.path.isfile(p)), None)
    if missing:
        raise DatasetError(f"image not found: {missing} (check --data-root)")
    return RetrievalSet(spec.name, spec.kind, spec.path, images, list(grouped.values()))


def load_retrieval(spec: DatasetSpec, data_root: str | None = None, img_key: str = "filepath",
                   caption_key: str = "title", sep: str = "\t", max_captions: int = 5) -> RetrievalSet:
    """Read a retrieval set: Karpathy JSON test split (first `max_captions` captions per image) or a CSV."""
    data_root = spec.root or data_root
    if spec.kind == "csv":
        return _csv(spec, data_root, img_key, caption_key, sep)
    if spec.kind in ("coco", "flickr30k", "karpathy"):
        return _karpathy(spec, data_root, max_captions)
    raise DatasetError(f"{spec.name} ({spec.kind}) is not a retrieval set")

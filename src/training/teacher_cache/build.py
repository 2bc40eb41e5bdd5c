"""Building a cache: run the frozen teacher once over a dataset and write its embeddings (the engine behind
`python -m training.cache_teacher`).

The work is cut into cache shards (CSV: `samples_per_shard` rows; WebDataset: one per tar); shard i is built by rank
i % world_size and written atomically (then its record), so a killed run re-run with the same command skips the
finished shards and completes the rest. The data is read by the training loaders' own readers (`read_csv_table`,
`TarReader`), so the keys written here are the keys training produces.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .. import distributed
from ..config import DataConfig, RuntimeConfig, TeacherConfig
from ..data import dataset_type
from ..data.common import as_captions
from ..data.csv import open_image, read_csv_table
from ..data.transforms import ImageDecodeError, ImageFormat, centre_view, render_view, sample_view
from ..data.wds import TarReader, check_url_support, expand_sources, make_key, shard_stem, source_names
from ..errors import UsageError
from ..fileio import read_json, write_json
from ..models import create_teacher
from ..precision import autocast_for, input_dtype
from .format import (
    CONFIG,
    FORMAT,
    MANIFEST,
    SHARD_DIR,
    caption_hash,
    file_sha256,
    hash64,
    shard_tensors,
    weights_sha256,
    write_shard,
)

log = logging.getLogger("training.cache_teacher")


@dataclass(frozen=True)
class CacheBuildConfig:
    """The cache builder's own flags (`python -m training.cache_teacher`)."""

    out: str | None = None
    verify: str | None = None
    quick: bool = False
    views: int = 1
    cache_dtype: str = "fp16"
    samples_per_shard: int = 10000
    aug_scale: tuple[float, float] = (0.9, 1.0)
    aug_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    aug_flip: float = 0.0


# ---- work units ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """One cache shard: CSV rows [start, end) of the loaded table, or one WebDataset tar."""

    index: int
    name: str
    start: int = 0
    end: int = 0
    url: str = ""
    source: str | None = None


def plan_csv(data: DataConfig, samples_per_shard: int) -> tuple[dict, list[Task], dict]:
    """Identity of the CSV data (stems, sha256, rows), its tasks, and the loaded table."""
    paths = [p for p in data.train_data.split(",") if p]
    roots = [r for r in data.data_root.split(",")] if data.data_root else []
    images, captions, keys, dropped = read_csv_table(paths, roots, data.csv_img_key, data.csv_caption_key,
                                                     data.csv_separator)
    per = max(1, int(samples_per_shard))
    tasks = [Task(i, f"csv-{i:06d}", start=s, end=min(s + per, len(keys))) for i, s in enumerate(range(0, len(keys),
                                                                                                         per))]
    csvs = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        csvs.append({"stem": stem, "sha256": file_sha256(path),
                     "rows": sum(1 for k in keys if k.rsplit("/", 1)[0] == stem)})
    if len({c["stem"] for c in csvs}) != len(csvs):
        raise UsageError("two CSVs share a file name; their sample keys (<stem>/<row>) would collide")
    identity = {"dataset_type": "csv", "csv": csvs, "img_key": data.csv_img_key, "caption_key": data.csv_caption_key,
                "dropped_at_load": dict(dropped), "samples_per_shard": per}
    return identity, tasks, {"images": images, "captions": captions, "keys": keys}


def plan_imagefolder(data: DataConfig, samples_per_shard: int) -> tuple[dict, list[Task], dict]:
    """Caption-less image folders: read by the training loader's reader, built as the CSV rows are (caption '')."""
    from ..data.imagefolder import read_image_folders

    table = read_image_folders([p for p in data.train_data.split(",") if p])
    per = max(1, int(samples_per_shard))
    n = len(table.keys)
    tasks = [Task(i, f"folder-{i:06d}", start=s, end=min(s + per, n)) for i, s in enumerate(range(0, n, per))]
    identity = {"dataset_type": "imagefolder", "images": n, "keys_hash64": hash64("\n".join(table.keys)),
                "samples_per_shard": per}
    return identity, tasks, {"images": table.images, "captions": [""] * n, "keys": table.keys}


def plan_wds(data: DataConfig) -> tuple[dict, list[Task], dict]:
    sources = expand_sources(data.train_data)
    key_format = data.wds_key_format or "auto"
    names = source_names(sources) if len(sources) > 1 and key_format != "key" else None
    tasks, i = [], 0
    for s, urls in enumerate(sources):
        for url in urls:
            tasks.append(Task(i, f"wds-{i:06d}-{shard_stem(url)}", url=url, source=names[s] if names else None))
            i += 1
    check_url_support([t.url for t in tasks])
    identity = {"dataset_type": "webdataset", "shards": [shard_stem(t.url) for t in tasks],
                "sources": names, "key_format": key_format,
                "caption_key": "txt" if data.wds_caption_key is None else data.wds_caption_key}
    return identity, tasks, {}


# ---- reading and preparing samples (DataLoader workers) ------------------------------------------------------------
def view_params(width: int, height: int, key: str, num_views: int, seed: int, scale, ratio, flip: float) -> list:
    """View 0 = centre; views 1..K-1 drawn from an RNG of (seed, key) only: rebuilt caches and resumed builds agree,
    and a cache built with more views extends one built with fewer."""
    rng = random.Random(f"teacher-cache/{seed}/{key}")
    return [centre_view(width, height)] + [sample_view(width, height, rng, scale=scale, ratio=ratio, flip_prob=flip)
                                           for _ in range(num_views - 1)]


def prepare_sample(image, caption, key: str, fmt: ImageFormat, tokenizer, num_views: int, seed: int,
                   scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), flip: float = 0.0) -> dict:
    """The teacher's inputs for one sample: its K views rendered in the teacher's format, and the tokens of each of
    its captions."""
    captions = as_captions(caption)
    w, h = image.size
    views = view_params(w, h, key, num_views, seed, scale, ratio, flip)
    return {"key": key, "pixels": torch.stack([render_view(image, v, fmt) for v in views]),
            "views": torch.tensor([v.as_tuple() for v in views], dtype=torch.int32),
            "source_size": torch.tensor([w, h], dtype=torch.int32),
            "caption_hash": torch.tensor(caption_hash(caption), dtype=torch.int64),
            "caption_count": torch.tensor(len(captions), dtype=torch.int32),
            "tokens": tokenizer(captions)}  # [C, L]


def _stack(samples: list[dict]) -> dict:
    """A batch: per-sample tensors stacked, the captions' tokens of all samples concatenated [ΣC, L]."""
    return {"key": [s["key"] for s in samples], "tokens": torch.cat([s["tokens"] for s in samples]),
            **{name: torch.stack([s[name] for s in samples]) for name in samples[0] if name not in ("key", "tokens")}}


class _BuildStream(IterableDataset):
    """Worker w prepares tasks w, w + workers, ...; yields batches tagged with their task, the last one flagged."""

    def __init__(self, tasks: list[Task], table: dict, data: DataConfig, build: CacheBuildConfig, seed: int,
                 fmt: ImageFormat, tokenizer):
        self.tasks, self.table, self.fmt, self.tokenizer = tasks, table, fmt, tokenizer
        self.batch_size, self.views, self.seed = int(data.batch_size), int(build.views), int(seed)
        self.scale, self.ratio, self.flip = tuple(build.aug_scale), tuple(build.aug_ratio), float(build.aug_flip)
        self.caption_key = "txt" if data.wds_caption_key is None else data.wds_caption_key
        self.key_format = data.wds_key_format or "auto"

    def _csv_items(self, task: Task, skipped: Counter):
        t = self.table
        for j in range(task.start, task.end):
            image, reason = open_image(t["images"][j])
            if reason:
                skipped[reason] += 1
                continue
            yield t["keys"][j], t["captions"][j], image

    def _wds_items(self, task: Task, skipped: Counter):
        reader = TarReader()  # the training loader's reader and caption rule: the same samples, keys and captions
        try:
            for raw_key, _, files in reader.samples(task.url, task.index):
                decoded = reader.decode(raw_key, files, task.url, self.caption_key)
                if decoded is not None:
                    image, caption = decoded
                    yield make_key(raw_key, task.url, task.source, self.key_format), caption, image
        finally:
            reader.close()
            for name, count in reader.skipped.items():
                skipped[name.split(":", 1)[0]] += count

    def __iter__(self):
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for task in self.tasks[wid::workers]:
            skipped: Counter = Counter()
            items = self._wds_items(task, skipped) if task.url else self._csv_items(task, skipped)
            batch: list = []
            for key, caption, image in items:
                try:  # the pixels decode here (lazily, at the training loader's DCT scale for each view)
                    batch.append(prepare_sample(image, caption, key, self.fmt, self.tokenizer, self.views, self.seed,
                                                self.scale, self.ratio, self.flip))
                except ImageDecodeError as e:
                    skipped[e.skip_reason] += 1
                    continue
                if len(batch) == self.batch_size:
                    yield {"task": task.index, "samples": _stack(batch), "last": False, "skipped": {}}
                    batch = []
            yield {"task": task.index, "samples": _stack(batch) if batch else None, "last": True,
                   "skipped": dict(skipped)}


# ---- the teacher -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def embed(teacher, samples: dict, device: torch.device, precision: str) -> tuple[list, list]:
    """Per member: text [ΣC, D] (every caption of the n samples, in order) and image [n, K, D] embeddings, fp32,
    L2-normalised."""
    n, k = samples["pixels"].shape[:2]
    pixels = samples["pixels"].flatten(0, 1).to(device, input_dtype(precision), non_blocking=True)
    tokens = samples["tokens"].to(device, non_blocking=True)
    texts, images = [], []
    with autocast_for(precision, device)():
        for member in teacher.members:
            texts.append(F.normalize(member.encode_text(tokens, normalize=True).float(), dim=-1).cpu())
            images.append(F.normalize(member.encode_image(pixels, normalize=True).float(), dim=-1).reshape(n, k, -1)
                          .cpu())
    return texts, images


def teacher_entries(config: TeacherConfig, teacher, bundle) -> list[dict]:
    names, weights = config.models, config.weights
    out = []
    for name, w, member in zip(names, weights, teacher.members):
        local = bool(w) and os.path.isfile(w)
        out.append({"name": name, "arch": member.arch_name, "pretrained": w,
                    "weights_sha256": weights_sha256(member), "file_sha256": file_sha256(w) if local else None,
                    "embed_dim": int(teacher.embed_dims[len(out)]),
                    "logit_scale": float(member.logit_scale.detach().exp().float()),
                    "context_length": int(bundle.context_length), "tokenizer": type(bundle.tokenizer).__name__})
        if getattr(member, "logit_bias", None) is not None:  # a SigLIP teacher: the sigmoid terms need its bias
            out[-1]["logit_bias"] = float(member.logit_bias.detach().float())
    return out


# ---- the build -------------------------------------------------------------------------------------------------------
def _done(out: str, task: Task) -> dict | None:
    """The task's record when its shard is finished (record written after the data file's rename, sizes agree)."""
    rec_path = os.path.join(out, SHARD_DIR, task.name + ".json")
    if not os.path.isfile(rec_path):
        return None
    try:
        rec = read_json(rec_path)
        path = os.path.join(out, SHARD_DIR, rec["file"])
        if os.path.isfile(path) and os.path.getsize(path) == rec["bytes"]:
            return rec
    except (OSError, ValueError, KeyError):
        pass
    return None


def build_cache(teacher_config: TeacherConfig, data: DataConfig, runtime: RuntimeConfig, build: CacheBuildConfig,
                env: distributed.DistEnv) -> dict | None:
    """Build (or complete) the cache in build.out; returns the manifest on rank 0."""
    from tqdm import tqdm

    if not teacher_config.models:
        raise UsageError("--teacher is required (the model whose embeddings are cached)")
    if build.views < 1:
        raise UsageError("--views must be at least 1 (view 0 is the centre view)")
    if not data.train_data:
        raise UsageError("--train-data is required")
    if teacher_config.teacher_compile:
        raise UsageError("--teacher-compile applies to training's live teacher, not to the teacher cache builder")
    kind = dataset_type(data)
    plans = {"csv": lambda: plan_csv(data, build.samples_per_shard), "webdataset": lambda: plan_wds(data),
             "imagefolder": lambda: plan_imagefolder(data, build.samples_per_shard)}
    if kind not in plans:
        raise UsageError(f"the teacher cache reads csv, webdataset or imagefolder data, not {kind}")
    precision = runtime.precision or ("amp" if env.device.type == "cuda" else "fp32")
    identity, tasks, table = plans[kind]()

    seed = runtime.seed
    torch.manual_seed(seed)
    teacher, bundle = create_teacher(teacher_config, env.device, precision)
    fmt = bundle.image_format
    config = {
        "format": FORMAT,
        "teachers": teacher_entries(teacher_config, teacher, bundle),
        "preprocessing": {**fmt.as_dict(), "decode": "PIL .convert('RGB')", "crop": "resized_crop of the view box"},
        "augmentation": {"views": int(build.views), "view0": "centre (largest centred square, as evaluation)",
                         "views_1_to_K-1": "random resized crop (torchvision algorithm) + optional flip",
                         "scale": list(build.aug_scale), "ratio": list(build.aug_ratio), "flip_prob": build.aug_flip,
                         "seed": int(seed), "rng": "random.Random('teacher-cache/{seed}/{key}')",
                         "params": "top,left,height,width,flip in source pixels"},
        "storage": {"dtype": build.cache_dtype, "normalised": True,
                    "scale": "per-vector float32, x = q * scale" if build.cache_dtype == "int8" else None,
                    "read": "cast to fp32 (x scale), then L2-normalised again"},
        "precision": precision,
        "data": identity,
        "tasks": len(tasks),
    }
    out = build.out
    os.makedirs(os.path.join(out, SHARD_DIR), exist_ok=True)
    if env.is_master:
        cfg_path = os.path.join(out, CONFIG)
        if not os.path.isfile(cfg_path):
            write_json(cfg_path, config)
        for name in os.listdir(os.path.join(out, SHARD_DIR)):  # leftovers of a killed run (no rank writes yet)
            if name.startswith(".tmp-"):
                os.remove(os.path.join(out, SHARD_DIR, name))
    distributed.barrier()
    existing, wanted = _identity(read_json(os.path.join(out, CONFIG))), _identity(config)
    if existing != wanted:
        diff = sorted(k for k in set(existing) | set(wanted) if existing.get(k) != wanted.get(k))
        raise UsageError(f"{out} holds a cache built with other settings ({', '.join(diff)} differ); use another "
                         f"--out, or delete {out} to rebuild")

    rank, world = env.rank, env.world_size
    mine = [t for t in tasks if t.index % world == rank]
    todo = [t for t in mine if _done(out, t) is None]
    log.info("rank %d: %d of its %d cache shards to build (%d already done)", rank, len(todo), len(mine),
             len(mine) - len(todo))
    total = (sum(t.end - t.start for t in todo) if kind != "webdataset" else None)
    bar = tqdm(total=total, unit="sample", desc=f"caching {teacher_config.teacher}", disable=not env.is_master,
               dynamic_ncols=True)
    if todo:
        stream = _BuildStream(todo, table, data, build, seed, fmt, bundle.tokenizer)
        loader = DataLoader(stream, batch_size=None, num_workers=min(data.workers, len(todo)),
                            pin_memory=env.device.type == "cuda")
        parts: dict[int, dict] = {}
        by_index = {t.index: t for t in todo}
        finished = len(mine) - len(todo)
        for item in loader:
            acc = parts.setdefault(item["task"], {"keys": [], "text": [], "image": [], "meta": []})
            samples = item["samples"]
            if samples is not None:
                texts, images = embed(teacher, samples, env.device, precision)
                acc["keys"] += samples["key"]
                acc["text"].append(texts)
                acc["image"].append(images)
                acc["meta"].append((samples["caption_hash"], samples["source_size"], samples["views"],
                                    samples["caption_count"]))
                bar.update(len(samples["key"]))
            if item["last"]:
                bar.update(sum(item["skipped"].values()))
                task = by_index[item["task"]]
                _write_task(out, task, parts.pop(item["task"]), item["skipped"], teacher, build.cache_dtype,
                            build.views)
                finished += 1
                bar.set_postfix(shards=f"{finished}/{len(mine)}")
    bar.close()
    distributed.barrier()
    manifest = None
    if env.is_master:
        manifest = _finish(out, config, tasks, world)
    distributed.barrier()
    return manifest


def _identity(config: dict) -> dict:
    """What must agree for a re-run to resume a cache: the config minus where the teacher file lies."""
    config = json.loads(json.dumps(config))
    for t in config.get("teachers", []):
        if t.get("file_sha256"):
            t.pop("pretrained", None)
    return config


def _write_task(out: str, task: Task, acc: dict, skipped: dict, teacher, dtype: str, num_views: int) -> None:
    members = len(teacher.members)
    if acc["keys"]:
        text = [torch.cat([t[m] for t in acc["text"]]) for m in range(members)]
        image = [torch.cat([v[m] for v in acc["image"]]) for m in range(members)]
        caption_hash = torch.cat([m[0] for m in acc["meta"]])
        source_size = torch.cat([m[1] for m in acc["meta"]])
        views = torch.cat([m[2] for m in acc["meta"]])
        counts = torch.cat([m[3] for m in acc["meta"]])
    else:  # every sample of the task was unusable: an empty shard still records that it is done
        dims = teacher.embed_dims
        text = [torch.zeros(0, d) for d in dims]
        image = [torch.zeros(0, num_views, d) for d in dims]
        caption_hash, source_size, views = torch.zeros(0), torch.zeros(0, 2), torch.zeros(0, num_views, 5)
        counts = torch.zeros(0, dtype=torch.int32)
    most = int(counts.max()) if len(counts) else 1
    if most > 1:  # several captions: [n, C, D], each sample's rows padded with its last caption
        text = [pad_captions(t, counts, most) for t in text]
    tensors = shard_tensors(acc["keys"], caption_hash, source_size, views, text, image, dtype,
                            counts if most > 1 else None)
    record = write_shard(os.path.join(out, SHARD_DIR, task.name + ".safetensors"), acc["keys"], tensors, dtype)
    record.update(name=task.name, skipped=skipped, captions=most, caption_total=int(counts.sum()),
                  source=task.url or {"rows": [task.start, task.end]})
    write_json(os.path.join(out, SHARD_DIR, task.name + ".json"), record)


def pad_captions(flat: torch.Tensor, counts: torch.Tensor, most: int) -> torch.Tensor:
    """[ΣC, D] caption embeddings -> [n, most, D]; a sample with fewer captions repeats its last one (unit vectors
    everywhere; `caption_count` says which are real)."""
    starts = torch.cumsum(counts.long(), 0) - counts.long()
    index = starts.unsqueeze(1) + torch.minimum(torch.arange(most).unsqueeze(0), counts.long().unsqueeze(1) - 1)
    return flat[index]


def _finish(out: str, config: dict, tasks: list[Task], world: int) -> dict:
    records, missing = [], []
    for t in tasks:
        rec = _done(out, t)
        (records.append(rec) if rec is not None else missing.append(t.name))
    if missing:
        raise UsageError(f"{len(missing)} cache shards are unfinished (first: {missing[0]}); re-run the same command "
                         f"to complete them")
    skipped: Counter = Counter()
    for r in records:
        skipped.update(r.get("skipped", {}))
    manifest = {**config, "complete": True,
                "counts": {"samples": sum(r["samples"] for r in records), "shards": len(records),
                           "captions": sum(r.get("caption_total", r["samples"]) for r in records),
                           "max_captions_per_sample": max([r.get("captions", 1) for r in records], default=1),
                           "bytes": sum(r["bytes"] for r in records), "skipped": dict(skipped)},
                "shards": records,
                "built": {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "world_size": world,
                          "torch": torch.__version__, "open_clip": _version("open_clip_torch")}}
    write_json(os.path.join(out, MANIFEST), manifest)
    return manifest


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001
        return None

"""`python -m training.cache_teacher`: run the frozen teacher once over a dataset and store its embeddings.

    python -m training.cache_teacher --teacher ViT-L-14 --teacher-pretrained openai \
        --train-data /data/cc3m/train.csv --data-root /data/cc3m --views 4 --out /data/cache/cc3m-L14
    torchrun --nproc_per_node 8 -m training.cache_teacher ...      # same world as training; shards split by rank
    python -m training.cache_teacher --verify /data/cache/cc3m-L14  # exit 0 / 1, one-line summary

The data flags are training's (`--train-data --dataset-type --csv-* --data-root --batch-size --workers`, the
WebDataset flags), so the keys written here are the keys the training loaders produce. The work is cut into cache
shards (CSV: `--samples-per-shard` rows; WebDataset: one per tar); shard i is built by rank i % world_size and
written atomically (temp file + rename, then its record), so a killed run re-run with the same command skips the
finished shards and completes the rest. Format: training/teacher_cache.py and docs/teacher_cache.md.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import sys
import time
import types
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import distributed
from .data.csv import open_image
from .data.transforms import ImageFormat, centre_view, render_view, sample_view
from .errors import UsageError
from .params import build_parser as build_train_parser
from .params import parse_args as parse_train_args
from .teacher_cache import (
    CONFIG,
    FORMAT,
    MANIFEST,
    SHARD_DIR,
    STORAGE_DTYPES,
    file_sha256,
    hash64,
    read_json,
    shard_tensors,
    verify_cache,
    weights_sha256,
    write_json_atomic,
    write_shard,
)

log = logging.getLogger(__name__)
_KEEP_HELP = {"teacher", "teacher_pretrained", "train_data", "dataset_type", "csv_img_key", "csv_caption_key",
              "csv_separator", "data_root", "workers", "batch_size", "precision", "seed", "device", "dist_backend",
              "dist_url", "help"}
_CACHE_FLAGS = ("--out", "--verify", "--quick", "--views", "--cache-dtype", "--samples-per-shard", "--aug-scale",
                "--aug-ratio", "--aug-flip")


def _pair(text: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers 'a,b', got {text!r}") from None
    return a, b


def build_parser() -> argparse.ArgumentParser:
    """Training's parser (same data and teacher flags, same defaults) plus the cache-building flags."""
    p = build_train_parser()
    p.prog = "python -m training.cache_teacher"
    p.allow_abbrev = False  # the cache flags are split off by exact name before training's parser sees the rest
    p.description = "Build (or --verify) a teacher-embedding cache for training with --teacher-cache."
    own_help = {"precision": "teacher precision (default: amp on CUDA, fp32 on CPU)",
                "seed": "seed of the random views 1..K-1 (drawn per sample key)",
                "batch_size": "samples per teacher forward (each with --views images)",
                "workers": "decoding/rendering workers per process (each builds whole shards)"}
    for action in p._actions:  # show only what matters here; other training flags are accepted and ignored
        if action.dest in own_help:
            action.help = own_help[action.dest]
        elif action.dest not in _KEEP_HELP and not action.dest.startswith("wds_"):
            action.help = argparse.SUPPRESS
    p.set_defaults(precision=None, batch_size=256)
    g = p.add_argument_group("teacher cache")
    g.add_argument("--out", default=None, metavar="DIR", help="cache folder (created; a re-run resumes it)")
    g.add_argument("--verify", default=None, metavar="DIR",
                   help="check a cache (manifest, sha256 of every shard, tensors, keys); exit 0 if sound")
    g.add_argument("--quick", action="store_true", help="with --verify: sizes and structure only, no sha256")
    g.add_argument("--views", type=int, default=1,
                   help="image views per sample: view 0 = centre (eval) view, 1..K-1 = random training crops")
    g.add_argument("--cache-dtype", default="fp16", choices=list(STORAGE_DTYPES),
                   help="storage of the embeddings (int8 = per-vector scale)")
    g.add_argument("--samples-per-shard", type=int, default=10000, help="CSV rows per cache shard")
    g.add_argument("--aug-scale", type=_pair, default=(0.9, 1.0),
                   help="RandomResizedCrop area scale of views 1..K-1 (CLIP-KD: 0.9,1.0)")
    g.add_argument("--aug-ratio", type=_pair, default=(3 / 4, 4 / 3), help="RandomResizedCrop aspect-ratio range")
    g.add_argument("--aug-flip", type=float, default=0.0, help="horizontal-flip probability of views 1..K-1")
    return p


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


def plan_csv(args) -> tuple[dict, list[Task], dict]:
    """Identity of the CSV data (stems, sha256, rows), its tasks, and the loaded table."""
    from .data.csv import read_csv_table

    paths = [p for p in args.train_data.split(",") if p]
    roots = [r for r in args.data_root.split(",")] if args.data_root else []
    images, captions, keys, dropped = read_csv_table(paths, roots, args.csv_img_key, args.csv_caption_key,
                                                     args.csv_separator)
    per = max(1, int(args.samples_per_shard))
    tasks = [Task(i, f"csv-{i:06d}", start=s, end=min(s + per, len(keys))) for i, s in enumerate(range(0, len(keys),
                                                                                                         per))]
    csvs = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        csvs.append({"stem": stem, "sha256": file_sha256(path),
                     "rows": sum(1 for k in keys if k.rsplit("/", 1)[0] == stem)})
    if len({c["stem"] for c in csvs}) != len(csvs):
        raise UsageError("two CSVs share a file name; their sample keys (<stem>/<row>) would collide")
    identity = {"dataset_type": "csv", "csv": csvs, "img_key": args.csv_img_key, "caption_key": args.csv_caption_key,
                "dropped_at_load": dict(dropped), "samples_per_shard": per}
    return identity, tasks, {"images": images, "captions": captions, "keys": keys}


def plan_wds(args) -> tuple[dict, list[Task], dict]:
    from .data.webdataset import check_url_support, expand_sources, shard_stem, source_names

    sources = expand_sources(args.train_data)
    key_format = getattr(args, "wds_key_format", "auto") or "auto"
    names = source_names(sources) if len(sources) > 1 and key_format != "key" else None
    tasks, i = [], 0
    for s, urls in enumerate(sources):
        for url in urls:
            tasks.append(Task(i, f"wds-{i:06d}-{shard_stem(url)}", url=url, source=names[s] if names else None))
            i += 1
    check_url_support([t.url for t in tasks])
    identity = {"dataset_type": "webdataset", "shards": [shard_stem(t.url) for t in tasks],
                "sources": names, "key_format": key_format,
                "caption_key": getattr(args, "wds_caption_key", "txt") or "txt"}
    return identity, tasks, {}


# ---- reading and preparing samples (DataLoader workers) ------------------------------------------------------------
def view_params(width: int, height: int, key: str, num_views: int, seed: int, scale, ratio, flip: float) -> list:
    """View 0 = centre; views 1..K-1 drawn from an RNG of (seed, key) only: rebuilt caches and resumed builds agree,
    and a cache built with more views extends one built with fewer."""
    rng = random.Random(f"teacher-cache/{seed}/{key}")
    return [centre_view(width, height)] + [sample_view(width, height, rng, scale=scale, ratio=ratio, flip_prob=flip)
                                           for _ in range(num_views - 1)]


def prepare_sample(image, caption: str, key: str, fmt: ImageFormat, tokenizer, num_views: int, seed: int,
                   scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), flip: float = 0.0) -> dict:
    """The teacher's inputs for one sample: its K views rendered in the teacher's format, and its tokens."""
    w, h = image.size
    views = view_params(w, h, key, num_views, seed, scale, ratio, flip)
    return {"key": key, "pixels": torch.stack([render_view(image, v, fmt) for v in views]),
            "views": torch.tensor([v.as_tuple() for v in views], dtype=torch.int32),
            "source_size": torch.tensor([w, h], dtype=torch.int32),
            "caption_hash": torch.tensor(hash64(caption), dtype=torch.int64),
            "tokens": tokenizer([caption])[0]}


def _stack(samples: list[dict]) -> dict:
    return {"key": [s["key"] for s in samples],
            **{name: torch.stack([s[name] for s in samples]) for name in samples[0] if name != "key"}}


class _BuildStream(IterableDataset):
    """Worker w prepares tasks w, w + workers, ...; yields batches tagged with their task, the last one flagged."""

    def __init__(self, tasks: list[Task], table: dict, args, fmt: ImageFormat, tokenizer):
        self.tasks, self.table, self.fmt, self.tokenizer = tasks, table, fmt, tokenizer
        self.batch_size, self.views, self.seed = int(args.batch_size), int(args.views), int(args.seed)
        self.scale, self.ratio, self.flip = tuple(args.aug_scale), tuple(args.aug_ratio), float(args.aug_flip)
        self.caption_key = getattr(args, "wds_caption_key", "txt") or "txt"
        self.key_format = getattr(args, "wds_key_format", "auto") or "auto"

    def _csv_items(self, task: Task, skipped: Counter):
        t = self.table
        for j in range(task.start, task.end):
            image, reason = open_image(t["images"][j])
            if reason:
                skipped[reason] += 1
                continue
            yield t["keys"][j], t["captions"][j], image

    def _wds_items(self, task: Task, skipped: Counter):
        from .data.webdataset import IMAGE_EXTS, WdsDataset, _Reader, make_key

        reader = _Reader()
        caption_of = types.SimpleNamespace(caption_key=self.caption_key)  # WdsDataset._caption's only attribute
        try:
            for raw_key, _, files in reader.samples(task.url, task.index):
                files = reader.load(files)
                ext = next((e for e in IMAGE_EXTS if e in files), None)
                if ext is None:
                    reader.skip("missing_image", task.url, raw_key)
                    continue
                caption = WdsDataset._caption(caption_of, files, reader, task.url)  # exactly training's rule
                if caption is None:
                    continue
                try:
                    with Image.open(io.BytesIO(files[ext])) as im:
                        image = im.convert("RGB")
                except Exception:  # noqa: BLE001 - as the training loader: a bad image is counted
                    reader.skip("corrupt_image", task.url, raw_key)
                    continue
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
                batch.append(prepare_sample(image, caption, key, self.fmt, self.tokenizer, self.views, self.seed,
                                            self.scale, self.ratio, self.flip))
                if len(batch) == self.batch_size:
                    yield {"task": task.index, "samples": _stack(batch), "last": False, "skipped": {}}
                    batch = []
            yield {"task": task.index, "samples": _stack(batch) if batch else None, "last": True,
                   "skipped": dict(skipped)}


# ---- the teacher -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def embed(teacher, samples: dict, device: torch.device, precision: str) -> tuple[list, list]:
    """Per member: text [n, D] and image [n, K, D] embeddings, fp32, L2-normalised."""
    from .precision import autocast_for, input_dtype

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


def teacher_entries(args, teacher, bundle) -> list[dict]:
    names = args.teacher_list
    weights = args.teacher_pretrained_list or [""] * len(names)
    out = []
    for name, w, member in zip(names, weights, teacher.members):
        local = bool(w) and os.path.isfile(w)
        out.append({"name": name, "arch": member.arch_name, "pretrained": w,
                    "weights_sha256": weights_sha256(member), "file_sha256": file_sha256(w) if local else None,
                    "embed_dim": int(teacher.embed_dims[len(out)]),
                    "logit_scale": float(member.logit_scale.exp().float()),
                    "context_length": int(bundle.context_length), "tokenizer": type(bundle.tokenizer).__name__})
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


def build_cache(args, env: distributed.DistEnv) -> dict | None:
    """Build (or complete) the cache in args.out; returns the manifest on rank 0."""
    from tqdm import tqdm

    from .config import Config
    from .models import create_teacher

    if not args.teacher_list:
        raise UsageError("--teacher is required (the model whose embeddings are cached)")
    if args.views < 1:
        raise UsageError("--views must be at least 1 (view 0 is the centre view)")
    if not args.train_data:
        raise UsageError("--train-data is required")
    from .data import infer_dataset_type

    kind = args.dataset_type if args.dataset_type != "auto" else infer_dataset_type(args.train_data)
    if kind not in ("csv", "webdataset"):
        raise UsageError(f"the teacher cache reads csv or webdataset data, not {kind}")
    precision = args.precision or ("amp" if env.device.type == "cuda" else "fp32")
    args.precision = precision
    identity, tasks, table = plan_csv(args) if kind == "csv" else plan_wds(args)

    torch.manual_seed(args.seed)
    teacher, bundle = create_teacher(Config.from_args(args).teacher, env.device, precision)
    fmt = bundle.image_format
    config = {
        "format": FORMAT,
        "teachers": teacher_entries(args, teacher, bundle),
        "preprocessing": {**fmt.as_dict(), "decode": "PIL .convert('RGB')", "crop": "resized_crop of the view box"},
        "augmentation": {"views": int(args.views), "view0": "centre (largest centred square, as evaluation)",
                         "views_1_to_K-1": "random resized crop (torchvision algorithm) + optional flip",
                         "scale": list(args.aug_scale), "ratio": list(args.aug_ratio), "flip_prob": args.aug_flip,
                         "seed": int(args.seed), "rng": "random.Random('teacher-cache/{seed}/{key}')",
                         "params": "top,left,height,width,flip in source pixels"},
        "storage": {"dtype": args.cache_dtype, "normalised": True,
                    "scale": "per-vector float32, x = q * scale" if args.cache_dtype == "int8" else None,
                    "read": "cast to fp32 (x scale), then L2-normalised again"},
        "precision": precision,
        "data": identity,
        "tasks": len(tasks),
    }
    out = args.out
    os.makedirs(os.path.join(out, SHARD_DIR), exist_ok=True)
    if env.is_master:
        cfg_path = os.path.join(out, CONFIG)
        if not os.path.isfile(cfg_path):
            write_json_atomic(cfg_path, config)
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
    total = (sum(t.end - t.start for t in todo) if kind == "csv" else None)
    bar = tqdm(total=total, unit="sample", desc=f"caching {','.join(args.teacher_list)}", disable=not env.is_master,
               dynamic_ncols=True)
    if todo:
        stream = _BuildStream(todo, table, args, fmt, bundle.tokenizer)
        loader = DataLoader(stream, batch_size=None, num_workers=min(args.workers, len(todo)),
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
                acc["meta"].append((samples["caption_hash"], samples["source_size"], samples["views"]))
                bar.update(len(samples["key"]))
            if item["last"]:
                bar.update(sum(item["skipped"].values()))
                task = by_index[item["task"]]
                _write_task(out, task, parts.pop(item["task"]), item["skipped"], teacher, args.cache_dtype, args.views)
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
    else:  # every sample of the task was unusable: an empty shard still records that it is done
        dims = teacher.embed_dims
        text = [torch.zeros(0, d) for d in dims]
        image = [torch.zeros(0, num_views, d) for d in dims]
        caption_hash, source_size, views = torch.zeros(0), torch.zeros(0, 2), torch.zeros(0, num_views, 5)
    tensors = shard_tensors(acc["keys"], caption_hash, source_size, views, text, image, dtype)
    record = write_shard(os.path.join(out, SHARD_DIR, task.name + ".safetensors"), acc["keys"], tensors, dtype)
    record.update(name=task.name, skipped=skipped,
                  source=task.url or {"rows": [task.start, task.end]})
    write_json_atomic(os.path.join(out, SHARD_DIR, task.name + ".json"), record)


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
                           "bytes": sum(r["bytes"] for r in records), "skipped": dict(skipped)},
                "shards": records,
                "built": {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "world_size": world,
                          "torch": torch.__version__, "open_clip": _version("open_clip_torch")}}
    write_json_atomic(os.path.join(out, MANIFEST), manifest)
    return manifest


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001
        return None


def run(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.verify:
        ok, summary = verify_cache(ns.verify, checksum=not ns.quick)
        print(summary)
        return 0 if ok else 1
    if not ns.out:
        parser.error("--out DIR (build) or --verify DIR is required")
    # training's own post-processing of the flags (teacher lists, ...), then the cache flags on top
    train_argv = []
    it = iter(argv)
    for a in it:
        name = a.split("=", 1)[0]
        if name in _CACHE_FLAGS:
            if "=" not in a and name != "--quick":
                next(it, None)
            continue
        train_argv.append(a)
    args = parse_train_args(train_argv)
    for k, v in vars(ns).items():
        setattr(args, k, v)
    env = distributed.init_distributed(args.device, args.dist_backend, args.dist_url)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s | %(levelname)s | %(message)s")
    log.setLevel(logging.INFO if env.is_master else logging.WARNING)
    try:
        build_cache(args, env)
        if env.is_master:
            ok, summary = verify_cache(args.out)
            print(summary)
            return 0 if ok else 1
        return 0
    finally:
        distributed.cleanup()


def main(argv=None) -> int:
    try:
        return run(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

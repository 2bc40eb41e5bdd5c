"""Data-loading benchmark: decoded + augmented samples/s per worker, CSV vs our WebDataset vs open_clip's.

    python benchmarks/dataloader.py                          # 600 JPEGs (384 px shorter side), 224 px crops
    python benchmarks/dataloader.py --num-images 2000 --workers 1 2 4 --repeats 3
    python benchmarks/dataloader.py --skip-pipelines --skip-step --num-images 300   # CPU-ms per sample only

Builds (once, cached in --data-dir) a CSV dataset of synthetic photo-like JPEGs stored the way
scripts/prepare_cc3m.sh stores them (shorter side 384, JPEG q95), converts it with `python -m training.data.convert`,
then times the same decode + open_clip train preprocessing (RandomResizedCrop 224, bicubic, normalise) + tokenizer
through:
  csv        training.data.csv (map-style, one file per sample)
  wds        training.data.wds.get_wds_dataset (this project)
  reference  open_clip_train's get_wds_dataset pipeline on the same shards (see `reference_loader`)
Two measures, median over --repeats, interleaved so machine noise hits all pipelines alike:
  CPU time    samples per CPU-second with the pipeline run in-process (workers=0, one torch thread): the rate one
              worker sustains on a core of its own; robust on a shared machine
  wall clock  samples/s with --workers DataLoader workers, from the first batch to the last (start-up excluded);
              "per worker" = samples/s / workers

Then CPU-ms per sample in a worker (in-process, one thread, interleaved) for our loader before this data path (float,
full decode, tokenised per sample), with uint8 crops, with reduced JPEG decode, with stored token ids (the default),
with device-side augmentation (--decode-device: the worker only reads the bytes and draws the view), and open_clip's
reference pipeline, on --source-size sources and on sources twice the crop size. With them, the trainer-side cost of
that last path: ms per sample of training.data.device.BatchDecoder (decode_jpeg + crop/resize/flip) on
--decode-device (cpu: CPU time of one thread, like the workers; cuda: wall time, synchronised).

Then the trainer's view: a real training step (`training.train.train_step`, tiny-student + tiny-teacher KD by default)
fed by our WebDataset loader with --step-workers workers; data time = time blocked waiting for the next batch,
reported as a fraction of (data time + step time). --step-device cuda runs it on the GPU (amp_bf16; fp32 on the CPU),
--step-decode-device cpu|cuda with the trainer-side decode (its time is part of the step). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import statistics
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import open_clip  # noqa: E402

import training  # noqa: E402,F401  (registers the tiny model configs)
from training.config import DataConfig, section_from  # noqa: E402
from training.data.common import DataTransforms  # noqa: E402
from training.data.device import BatchDecoder, normalize_pixels  # noqa: E402
from training.data.transforms import ImageFormat, PairedViews, SourceImage  # noqa: E402
from training.data.wds import get_wds_dataset  # noqa: E402

TOKENIZER = "ViT-B-16"  # open_clip's CLIP tokenizer (the same for ViT-B-32, ViT-T-16, ...)
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def make_dataset(folder: str, n: int, short_side: int, seed: int = 0, tokenize: str = TOKENIZER) -> tuple[str, str]:
    """CSV of photo-like JPEGs (smooth colour fields + texture) and the same data as shards (with stored token ids
    of `tokenize`); returns (csv, pattern)."""
    csv = os.path.join(folder, "train.csv")
    shards = os.path.join(folder, "shards")
    if not os.path.exists(os.path.join(shards, "tokens.json")):
        os.makedirs(os.path.join(folder, "images"), exist_ok=True)
        rng = np.random.default_rng(seed)
        rows = ["filepath\ttitle"]
        for i in range(n):
            long_side = int(short_side * rng.uniform(1.0, 1.5))
            h, w = (short_side, long_side) if i % 2 else (long_side, short_side)
            base = rng.integers(0, 255, (max(2, h // 48), max(2, w // 48), 3), dtype=np.uint8)
            img = Image.fromarray(base).resize((w, h), Image.BICUBIC)
            arr = np.asarray(img, dtype=np.int16) + rng.normal(0, 12, (h, w, 3)).astype(np.int16)
            rel = f"images/{i:06d}.jpg"
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(os.path.join(folder, rel), quality=95)
            rows.append(f"{rel}\ta synthetic photo number {i} with some colours")
        with open(csv, "w") as f:
            f.write("\n".join(rows) + "\n")
        from training.data.convert import main as convert

        with contextlib.redirect_stdout(io.StringIO()):
            convert([csv, "--data-root", folder, "--out", shards, "--samples-per-shard", str(max(1, n // 12)),
                     "--overwrite", "--no-progress", "--tokenize", tokenize])
    names = sorted(f for f in os.listdir(shards) if f.endswith(".tar"))
    pattern = os.path.join(shards, "{" + names[0][:-4] + ".." + names[-1][:-4] + "}.tar")
    return csv, pattern


def data_args(opts, csv: str, pattern: str, kind: str, workers: int) -> SimpleNamespace:
    return SimpleNamespace(
        train_data=csv if kind == "csv" else pattern, val_data=None, data_root=os.path.dirname(csv),
        csv_img_key="filepath", csv_caption_key="title", csv_separator="\t", train_num_samples=opts.num_images,
        batch_size=opts.batch_size, workers=workers, seed=0, dataset_resampled=False,
        train_data_upsampling_factors=None, wds_caption_key="txt", wds_key_format="auto", wds_shuffle_buffer=5000,
        rank=0, world_size=1, distributed=False, horovod=False)


def make_loader(kind: str, args, preprocess, tokenizer):
    """An iterable over one epoch of batches for pipeline `kind`."""
    transforms = DataTransforms(student_train=preprocess, student_val=preprocess, tokenizer=tokenizer)
    data = section_from(DataConfig, vars(args))
    if kind == "csv":
        from training.data.csv import get_csv_dataset

        info = get_csv_dataset(data, transforms, seed=args.seed)
        info.set_epoch(0, 0)
        return info.dataloader
    if kind == "wds":
        info = get_wds_dataset(data, transforms, seed=args.seed, rank=args.rank, world_size=args.world_size)
        info.set_epoch(0, 0)
        return info.dataloader
    return reference_loader(args, preprocess, tokenizer)


def reference_loader(args, preprocess, tokenizer):
    """open_clip_train's get_wds_dataset pipeline, stage for stage.

    open_clip_train's own function cannot run on webdataset 1.x (its `tarfile_to_samples_nothrow` chokes on the
    end-of-shard marker webdataset 1.x yields: KeyError 'fname'; open_clip pins webdataset<=0.2.86), so its
    tar -> samples stage is replaced by webdataset's `tarfile_to_samples`; every other stage, buffer size and the
    with_epoch/WebLoader set-up are open_clip's (its detshuffle2 / filter / handler when importable).
    """

    import webdataset as wds

    try:
        from open_clip_train.data import SharedEpoch, detshuffle2, filter_no_caption_or_no_image, log_and_continue
        shard_shuffle = detshuffle2(bufsize=2000, initial=500, seed=args.seed, epoch=SharedEpoch(0))
    except ImportError:
        def filter_no_caption_or_no_image(sample):
            return "txt" in sample and any(e in sample for e in ("png", "jpg", "jpeg", "webp"))

        log_and_continue = wds.warn_and_continue
        shard_shuffle = wds.detshuffle(2000, 500, seed=args.seed)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(args.train_data), shard_shuffle, wds.split_by_node, wds.split_by_worker,
        wds.tarfile_to_samples(handler=log_and_continue), wds.shuffle(bufsize=5000, initial=1000),
        wds.select(filter_no_caption_or_no_image), wds.decode("pilrgb", handler=log_and_continue),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=preprocess, text=lambda text: tokenizer(text)[0]), wds.to_tuple("image", "text"),
        wds.batched(args.batch_size, partial=False))
    num_batches = math.ceil(args.train_num_samples / args.batch_size)
    pipeline = pipeline.with_epoch(math.ceil(num_batches / max(1, args.workers)))
    return wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=args.workers,
                         persistent_workers=args.workers > 0)


def count(batch) -> int:
    return len(batch["key"]) if isinstance(batch, dict) else len(batch[0])


def wall_rate(loader) -> float:
    """Samples/s from the first batch to the last (worker start-up excluded)."""
    start, n = None, 0
    for batch in loader:
        if start is None:
            start = time.perf_counter()
            continue
        n += count(batch)
    return n / max(time.perf_counter() - start, 1e-9)


def cpu_rate(loader) -> float:
    """Samples per CPU-second of one process running the whole pipeline (workers=0, one torch thread): what one
    worker sustains when it has a core to itself, insensitive to other load on the machine."""
    start, n = time.process_time(), 0
    for batch in loader:
        n += count(batch)
    return n / max(time.process_time() - start, 1e-9)


def bench_pipelines(opts, csv: str, pattern: str) -> list[dict]:
    preprocess = open_clip.image_transform(opts.image_size, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    kinds = ("csv", "wds", "reference")
    measures = [("cpu", 0)] + [("wall", w) for w in opts.workers]
    rates: dict = {(k, m): [] for k in kinds for m in measures}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    for _ in range(opts.repeats):  # interleaved: noise hits every pipeline alike
        for measure in measures:
            for kind in kinds:
                loader = make_loader(kind, data_args(opts, csv, pattern, kind, measure[1]), preprocess, tokenizer)
                rates[kind, measure].append((cpu_rate if measure[0] == "cpu" else wall_rate)(loader))
    torch.set_num_threads(threads)
    rows = []
    for measure in measures:
        ref = statistics.median(rates["reference", measure])
        for kind in kinds:
            rate = statistics.median(rates[kind, measure])
            rows.append({"pipeline": kind, "measure": measure[0], "workers": measure[1], "rate": rate,
                         "per_worker": rate / max(1, measure[1]), "vs_ref": rate / ref})
    return rows


class BeforeViews:
    """Our views as they were rendered before the uint8 path, for the "before" rows: from a full decode and (with
    `normalise`) as normalised floats on the CPU (to_tensor + normalize: the same arithmetic the device does now)."""

    def __init__(self, views: PairedViews, normalise: bool):
        self.views, self.normalise = views, normalise

    def __call__(self, image, view=None, rng=None):
        out = self.views(image.full() if isinstance(image, SourceImage) else image, view=view, rng=rng)
        if self.normalise:
            out["image"] = normalize_pixels(out["image"], self.views.student)
        return out


# (label, uint8, reduced decode, stored token ids, encoded: the bytes only); the 4th is the default
DEVICE_SIDE = "ours with device-side augmentation (--decode-device): bytes only"
OURS = [("ours before: float, full decode, tokenise", False, False, False, False),
        ("ours uint8, full decode, tokenise", True, False, False, False),
        ("ours uint8, reduced decode, tokenise", True, True, False, False),
        ("ours uint8, reduced decode, stored ids (default)", True, True, True, False),
        (f"{DEVICE_SIDE}, tokenise", True, True, False, True),
        (f"{DEVICE_SIDE}, stored ids", True, True, True, True)]


def view_format(opts) -> ImageFormat:
    return ImageFormat(opts.image_size, OPENAI_MEAN, OPENAI_STD, "bicubic")


def worker_loader(opts, pattern: str, variant, tokenizer, preprocess):
    """One in-process epoch (workers=0) of our WebDataset loader in one configuration, or of the reference."""
    args = data_args(opts, "", pattern, "wds", 0)
    if variant is None:
        return reference_loader(args, preprocess, tokenizer)
    _, uint8, reduced, stored, encoded = variant
    views = PairedViews(view_format(opts), None, train=True, seed=0, encoded=encoded)
    transforms = DataTransforms(tokenizer=tokenizer, train_views=views if reduced and uint8 else
                                BeforeViews(views, normalise=not uint8))
    info = get_wds_dataset(section_from(DataConfig, vars(args)), transforms, seed=0, rank=0, world_size=1)
    if not stored:
        info.dataloader.dataset.token_shards = None  # tokenise every sample, as before the stored ids
    info.set_epoch(0, 0)
    return info.dataloader


def decode_ms(decoder: BatchDecoder, batches: list[dict]) -> float:
    """ms per sample of the trainer-side decode + crop of `batches`: CPU time on the CPU, synchronised wall time on
    a GPU."""
    gpu = decoder.device.type == "cuda"
    clock = time.perf_counter if gpu else time.process_time
    start = clock()
    for batch in batches:
        decoder(batch)
    if gpu:
        torch.cuda.synchronize(decoder.device)
    return 1000 * (clock() - start) / sum(count(b) for b in batches)


def bench_worker_cpu(opts) -> tuple[list[dict], list[dict]]:
    """CPU-ms per sample of a worker (in-process, one torch thread), interleaved over pipelines and sources; and the
    trainer-side decode's ms per sample on --decode-device for the device-side augmentation rows' batches."""
    # "2x": every train crop (>= 90% of the area, open_clip's scale) is at least twice the view on its shorter side
    two_x = 16 * math.ceil(2 * opts.image_size / 0.9 / 16)
    sources = {f"{opts.source_size} px sources": make_dataset(opts.data_dir, opts.num_images, opts.source_size)[1],
               f"{two_x} px sources (crops >= 2x the view)": make_dataset(
                   f"{opts.data_dir}-{two_x}", opts.num_images, two_x)[1]}
    tokenizer = open_clip.get_tokenizer(TOKENIZER)
    preprocess = open_clip.image_transform(opts.image_size, is_train=True)
    variants = [*OURS, None]
    ms: dict = {(src, i): [] for src in sources for i in range(len(variants))}
    decoder = BatchDecoder(view_format(opts), None, torch.device(opts.decode_device))
    shipped = {src: list(worker_loader(opts, pattern, OURS[-1], tokenizer, preprocess))
               for src, pattern in sources.items()}
    decode_runs: dict = {src: [] for src in sources}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if decoder.device.type == "cuda":
        decode_ms(decoder, shipped[next(iter(sources))][:2])  # CUDA context and nvjpeg start-up
    for _ in range(opts.repeats):
        for src, pattern in sources.items():
            for i, variant in enumerate(variants):
                ms[src, i].append(1000 / cpu_rate(worker_loader(opts, pattern, variant, tokenizer, preprocess)))
            decode_runs[src].append(decode_ms(decoder, shipped[src]))
    torch.set_num_threads(threads)
    decode_rows = [{"source": src, "device": decoder.device.type, "ms": statistics.median(decode_runs[src])}
                   for src in sources]
    rows = []
    for src in sources:
        ref = statistics.median(ms[src, len(variants) - 1])
        for i, variant in enumerate(variants):
            value = statistics.median(ms[src, i])
            rows.append({"source": src, "pipeline": variant[0] if variant else "open_clip reference "
                         "(image_transform + tokenizer)", "ms": value, "vs_ref": value / ref})
    return rows, decode_rows


def bench_step(opts, pattern: str) -> dict:
    from training import distributed
    from training.params import parse_config
    from training.train import train_step
    from training.trainer import Trainer

    gpu = opts.step_device == "cuda"
    argv = ["--model", opts.student, "--dataset-type", "webdataset", "--train-data", pattern,
            "--train-num-samples", str(opts.num_images), "--batch-size", str(opts.step_batch_size),
            "--workers", str(opts.step_workers), "--logs", "", "--device", opts.step_device, "--precision",
            "amp_bf16" if gpu else "fp32", "--warmup", "1", "--distill", opts.distill,
            "--decode-device", opts.step_decode_device]
    if opts.teacher:
        argv += ["--teacher", opts.teacher]
    trainer = Trainer(parse_config(argv), distributed.init_distributed("cpu"))
    data = trainer.data
    trainer.model.train()
    waits, steps = [], []
    data.set_epoch(0, 0)
    it = iter(data.dataloader)
    for i in range(min(opts.steps + 2, data.num_batches)):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        trainer.schedule(trainer.step)
        train_step(trainer, trainer.decoder(batch) if trainer.decoder else batch)
        trainer.step += 1
        if gpu:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if i >= 2:  # the first batches include worker start-up and shuffle-buffer fill
            waits.append(t1 - t0)
            steps.append(t2 - t1)
    wait, step = statistics.mean(waits), statistics.mean(steps)
    return {"model": f"{opts.student}" + (f" + {opts.teacher}" if opts.teacher else ""), "batch": opts.step_batch_size,
            "workers": opts.step_workers, "step_ms": 1000 * step, "wait_ms": 1000 * wait,
            "fraction": wait / (wait + step), "steps": len(steps), "samples_per_s": opts.step_batch_size / (wait + step)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="/tmp/clip_kd_bench_data")
    p.add_argument("--num-images", type=int, default=600)
    p.add_argument("--source-size", type=int, default=384, help="shorter side of the stored JPEGs")
    p.add_argument("--image-size", type=int, default=224, help="crop size of the preprocessing")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[1])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--student", default="tiny-student")
    p.add_argument("--teacher", default="tiny-teacher", help="'' for a student-only step")
    p.add_argument("--distill", default="task=1,crd=1,icl=1,fd=2000")
    p.add_argument("--step-batch-size", type=int, default=32)
    p.add_argument("--step-workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--step-device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--step-decode-device", default="workers", choices=["workers", "cpu", "cuda"],
                   help="the training step's --decode-device")
    p.add_argument("--skip-step", action="store_true", help="only the pipeline table")
    p.add_argument("--skip-pipelines", action="store_true", help="only the training-step table")
    p.add_argument("--skip-worker-cpu", action="store_true", help="no CPU-ms-per-sample table")
    p.add_argument("--decode-device", default="cpu", choices=["cpu", "cuda"],
                   help="where the trainer-side decode of the device-side augmentation rows is timed")
    opts = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - opts.step_workers))

    csv, pattern = make_dataset(opts.data_dir, opts.num_images, opts.source_size)
    import webdataset

    ref_name = f"open_clip_train's get_wds_dataset pipeline on webdataset {webdataset.__version__}"
    print(f"\n{opts.num_images} JPEGs, shorter side {opts.source_size}, preprocessing: open_clip train transform "
          f"{opts.image_size} px + tokenizer, batch {opts.batch_size}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}; reference = {ref_name}\n")
    rows = [] if opts.skip_pipelines else bench_pipelines(opts, csv, pattern)
    if rows:
        print("| pipeline | measure | workers | samples/s | samples/s per worker | vs reference |")
        print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        label = "CPU time, in-process" if row["measure"] == "cpu" else "wall clock"
        print(f"| {row['pipeline']} | {label} | {row['workers'] or 1} | {row['rate']:.1f} | {row['per_worker']:.1f} | "
              f"{row['vs_ref']:.2f}x |")
    if not opts.skip_worker_cpu:
        print("\n| source | worker pipeline (224 px train view + tokens) | CPU-ms per sample | vs open_clip |")
        print("|---|---|---:|---:|")
        rows, decode_rows = bench_worker_cpu(opts)
        for row in rows:
            print(f"| {row['source']} | {row['pipeline']} | {row['ms']:.2f} | {row['vs_ref']:.2f}x |")
        clock = "wall" if opts.decode_device == "cuda" else "CPU"
        print(f"\n| source | trainer-side decode + crop (BatchDecoder, batch {opts.batch_size}) | device | "
              f"{clock}-ms per sample |")
        print("|---|---|---|---:|")
        for row in decode_rows:
            print(f"| {row['source']} | decode_jpeg + resized_crop + flip | {row['device']} | {row['ms']:.2f} |")
    if not opts.skip_step:
        from training.tokenizers import same_tokenizer

        if not same_tokenizer(open_clip.get_tokenizer(opts.student), open_clip.get_tokenizer(TOKENIZER)):
            # the shards' stored token ids are the CLIP tokenizer's: the student's own for its step
            pattern = make_dataset(f"{opts.data_dir}-{opts.student}", opts.num_images, opts.source_size,
                                   tokenize=opts.student)[1]
        r = bench_step(opts, pattern)
        print(f"\n| training step ({opts.step_device}, --decode-device {opts.step_decode_device}) | batch | workers | "
              "step ms | data wait ms | data fraction | samples/s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        print(f"| {r['model']} | {r['batch']} | {r['workers']} | {r['step_ms']:.1f} | {r['wait_ms']:.1f} | "
              f"{100 * r['fraction']:.1f}% | {r['samples_per_s']:.1f} |")


if __name__ == "__main__":
    main()

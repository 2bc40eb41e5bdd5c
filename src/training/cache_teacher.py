"""`python -m training.cache_teacher`: run the frozen teacher once over a dataset and store its embeddings.

    python -m training.cache_teacher --teacher ViT-L-14 --teacher-pretrained openai \
        --train-data /data/cc3m/train.csv --data-root /data/cc3m --views 4 --out /data/cache/cc3m-L14
    torchrun --nproc_per_node 8 -m training.cache_teacher ...      # same world as training; shards split by rank
    python -m training.cache_teacher --verify /data/cache/cc3m-L14  # exit 0 / 1, one-line summary

The data flags are training's (`--train-data --dataset-type --csv-* --data-root --batch-size --workers`, the
WebDataset flags), so the keys written here are the keys the training loaders produce. The work is cut into cache
shards (CSV: `--samples-per-shard` rows; WebDataset: one per tar); shard i is built by rank i % world_size and
written atomically (temp file + rename, then its record), so a killed run re-run with the same command skips the
finished shards and completes the rest. Engine: training/teacher_cache/build.py; format: docs/teacher_cache.md.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import distributed
from .config import DataConfig, RuntimeConfig, TeacherConfig, section_from
from .errors import run_cli
from .params import Parser, add_csv_flags, add_data_source_flags, add_loader_flags, add_runtime_flags, add_teacher_flags
from .teacher_cache.build import CacheBuildConfig, build_cache
from .teacher_cache.format import STORAGE_DTYPES
from .teacher_cache.verify import verify_cache

log = logging.getLogger("training.cache_teacher")


def _pair(text: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers 'a,b', got {text!r}") from None
    return a, b


def add_cache_build_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("teacher cache", "what to build (or --verify)")
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


def build_parser() -> argparse.ArgumentParser:
    """Training's teacher, data, loader and runtime flags (same names and defaults, so the keys written here are the
    keys the training loaders produce) plus the cache-building flags."""
    p = Parser(prog="python -m training.cache_teacher", allow_abbrev=False,
               description="Build (or --verify) a teacher-embedding cache for training with --teacher-cache.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for add in (add_teacher_flags, add_data_source_flags, add_csv_flags, add_loader_flags, add_runtime_flags,
                add_cache_build_flags):
        add(p)
    # here: the teacher's precision (amp on CUDA, fp32 on CPU when unset), samples per teacher forward
    p.set_defaults(precision=None, batch_size=256)
    return p


def run(argv=None) -> int:
    parser = build_parser()
    values = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    build = section_from(CacheBuildConfig, values)
    if build.verify:
        ok, summary = verify_cache(build.verify, checksum=not build.quick)
        print(summary)
        return 0 if ok else 1
    if not build.out:
        parser.error("--out DIR (build) or --verify DIR is required")
    teacher, data, runtime = (section_from(cls, values) for cls in (TeacherConfig, DataConfig, RuntimeConfig))
    env = distributed.init_distributed(runtime.device, runtime.dist_backend, runtime.dist_url)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s | %(levelname)s | %(message)s")
    log.setLevel(logging.INFO if env.is_master else logging.WARNING)
    try:
        build_cache(teacher, data, runtime, build, env)
        if env.is_master:
            ok, summary = verify_cache(build.out)
            print(summary)
            return 0 if ok else 1
        return 0
    finally:
        distributed.cleanup()


def main(argv=None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())

"""The training side of a cache: `open_for_training` checks that the cache fits the run's teacher and data flags,
and returns the reader (what the data loaders join samples through) and the teacher that stands in for the live one."""

from __future__ import annotations

import logging
import os

from ..config import DataConfig, TeacherConfig, comma_list
from ..data import dataset_type
from ..data.wds import expand_sources, shard_stem
from ..errors import TeacherCacheError
from .format import file_sha256, load_manifest
from .reader import CachedTeacher, TeacherCache
from .verify import verify_shards_distributed

log = logging.getLogger("training.teacher_cache")


def _arch_matches(given: str, entry: dict) -> bool:
    stem = os.path.splitext(os.path.basename(given))[0]
    return given in (entry.get("name"), entry.get("arch")) or stem in (entry.get("name"), entry.get("arch"))


def check_teacher_flags(teacher: TeacherConfig, manifest: dict, cache_dir: str) -> None:
    """--teacher/--teacher-pretrained given with --teacher-cache must describe the cached teacher(s)."""
    teachers = manifest["teachers"]
    names = teacher.models
    cached = ",".join(t["name"] for t in teachers)
    if names:
        if len(names) != len(teachers) or not all(_arch_matches(n, t) for n, t in zip(names, teachers)):
            raise TeacherCacheError(f"--teacher {','.join(names)} differs from the teacher in the cache {cache_dir} "
                                    f"({cached}): drop --teacher or use a cache built for it")
    weights = comma_list(teacher.teacher_pretrained)  # only the weights given (TeacherConfig.weights pads with '')
    if weights:
        if len(weights) != len(teachers):
            raise TeacherCacheError(f"--teacher-pretrained lists {len(weights)} weights but the cache {cache_dir} holds "
                                    f"{len(teachers)} teacher(s) ({cached})")
        for w, t in zip(weights, teachers):
            if os.path.isfile(w):
                if t.get("file_sha256") and file_sha256(w) != t["file_sha256"]:
                    raise TeacherCacheError(f"--teacher-pretrained {w} is not the checkpoint the cache {cache_dir} was "
                                            f"built with (sha256 differs; cached: {t.get('pretrained')})")
                if not t.get("file_sha256"):
                    raise TeacherCacheError(f"--teacher-pretrained {w} differs from the cache's {t.get('pretrained')!r} "
                                            f"({cache_dir})")
            elif w != t.get("pretrained"):
                raise TeacherCacheError(f"--teacher-pretrained {w} differs from the cache's {t.get('pretrained')!r} "
                                        f"({cache_dir})")


def check_data_flags(data: DataConfig, manifest: dict, cache: TeacherCache) -> None:
    """Catch a data source the cache cannot serve before training starts (per-sample checks back this up)."""
    built = manifest.get("data", {})
    kind = dataset_type(data)
    if kind != built.get("dataset_type"):
        raise TeacherCacheError(f"the teacher cache {cache.dir} was built from {built.get('dataset_type')} data but "
                                f"training reads {kind} data: sample keys would not match")
    skip = cache.missing == "skip"
    if kind == "csv":
        cached = {c["stem"]: c for c in built.get("csv", [])}
        for path in [p for p in data.train_data.split(",") if p]:
            stem = os.path.splitext(os.path.basename(path))[0]
            entry = cached.get(stem)
            if entry is None:
                if not skip:
                    raise TeacherCacheError(f"{path} was not part of the teacher cache {cache.dir} (cached: "
                                            f"{', '.join(cached) or 'none'}); rebuild it or pass --cache-missing skip")
                log.warning("teacher cache: %s was not cached: all its samples will be skipped", path)
            elif os.path.isfile(path) and file_sha256(path) != entry["sha256"]:
                raise TeacherCacheError(f"{path} differs from the CSV the teacher cache {cache.dir} was built from "
                                        f"(sha256): CSV keys are row numbers, so cached targets would pair with other "
                                        f"rows; rebuild the cache")
    elif kind == "webdataset":
        if (data.wds_key_format or "auto") != built.get("key_format", "auto"):
            raise TeacherCacheError(f"--wds-key-format {data.wds_key_format} differs from the "
                                    f"cache's {built.get('key_format')}: sample keys would not match")
        cached = set(built.get("shards", []))
        wanted = [u for urls in expand_sources(data.train_data) for u in urls]
        absent = [u for u in wanted if shard_stem(u) not in cached]
        if absent and not skip:
            raise TeacherCacheError(f"{len(absent)} of {len(wanted)} training shards were not cached (first: "
                                    f"{absent[0]}); rebuild the cache or pass --cache-missing skip")
        if absent:
            log.warning("teacher cache: %d of %d shards were not cached: their samples will be skipped", len(absent),
                        len(wanted))


def open_for_training(teacher: TeacherConfig, data: DataConfig, *, shard_teacher: bool = False
                      ) -> tuple[TeacherCache, CachedTeacher]:
    """--teacher-cache: load and check the manifest, flags and shards; returns the reader (the data layer's
    `DataTransforms.teacher_cache`) and the stand-in teacher. `shard_teacher`: --fsdp-shard-teacher was given."""
    cache_dir = teacher.teacher_cache
    if shard_teacher:
        raise TeacherCacheError("--fsdp-shard-teacher has nothing to shard with --teacher-cache (no teacher is built)")
    manifest = load_manifest(cache_dir)
    check_teacher_flags(teacher, manifest, cache_dir)
    verify_shards_distributed(cache_dir, manifest, teacher.cache_verify or "checksum")
    cache = TeacherCache(cache_dir, manifest, missing=teacher.cache_missing or "error",
                         views=teacher.cache_views or "auto")
    check_data_flags(data, manifest, cache)
    logging.info("teacher cache %s: %d samples, %d view(s) (training on views %s), teacher %s, %s; no teacher is "
                 "built or run", cache_dir, len(cache), cache.num_views, cache.view_choices,
                 ",".join(t["name"] for t in manifest["teachers"]), cache.dtype)
    return cache, CachedTeacher(manifest)

"""Teacher-embedding cache: the on-disk format, its writer, reader, manifest, verification and lookup by key.

Modules: `format` (constants, storage dtypes, hashing, shard files, the manifest), `build` (the writer behind
`python -m training.cache_teacher`), `reader` (lookup by key), `verify`, `join` (training: `open_for_training`).

A cache is a folder built by `python -m training.cache_teacher` (docs/teacher_cache.md):

    DIR/manifest.json                  written last, when every shard is done ("complete": true)
    DIR/config.json                    the build settings; a re-run must match them (resume) or is refused
    DIR/shards/<name>.safetensors      one cache shard (written to a temp file, then renamed)
    DIR/shards/<name>.json             its record (samples, bytes, sha256), written after the rename

A shard holds, for n samples, K views and M teachers (ensemble members):

    key_hash       [n]        int64    blake2b-64 of the sample key (the join key; keys are in the metadata)
    caption_hash   [n]        int64    blake2b-64 of the caption the text embedding was computed from
    source_size    [n, 2]     int32    (width, height) of the decoded source image the crop boxes refer to
    views          [n, K, 5]  int32    ViewParams (top, left, height, width, flip) in source pixels; view 0 = centre
    text/<m>       [n, D_m]            L2-normalised text embedding of member m, in the storage dtype
    image/<m>      [n, K, D_m]         L2-normalised image embedding of each view
    text_scale/<m> [n], image_scale/<m> [n, K]   float32 per-vector scales (int8 storage only)

Training joins batches to the cache by sample key (`TeacherCache.sample_entry`, called from `make_sample` through the
data layer's `TeacherJoin` interface), replays
the stored crop so the student sees exactly the view the teacher embedded, and `CachedTeacher` stands in for the
frozen teacher in `train.teacher_outputs`.
"""

from ..errors import TeacherCacheError
from .format import (
    CONFIG,
    FORMAT,
    MANIFEST,
    MISSING_REASON,
    SHARD_DIR,
    STORAGE_DTYPES,
    SampleNotCached,
    decode,
    encode,
    file_sha256,
    hash64,
    load_manifest,
    read_shard,
    shard_tensors,
    weights_sha256,
    write_shard,
)
from .join import open_for_training
from .reader import CachedTeacher, TeacherCache
from .verify import check_shard, verify_cache

__all__ = ["CONFIG", "FORMAT", "MANIFEST", "MISSING_REASON", "SHARD_DIR", "STORAGE_DTYPES", "CachedTeacher",
           "SampleNotCached", "TeacherCache", "TeacherCacheError", "check_shard", "decode", "encode", "file_sha256",
           "hash64", "load_manifest", "open_for_training", "read_shard", "shard_tensors", "verify_cache",
           "weights_sha256", "write_shard"]

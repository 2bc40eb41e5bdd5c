"""The cache's on-disk format: constants, storage dtypes, hashing, shard files and the manifest (see the package
docstring for the layout)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.common import MISSING_REASON, SampleNotCached
from ..errors import TeacherCacheError, UsageError
from ..fileio import file_sha256, read_json, write_bytes

__all__ = ["CONFIG", "FORMAT", "MANIFEST", "MISSING_REASON", "NORM_TOL", "SHARD_DIR", "STORAGE_DTYPES",
           "SampleNotCached", "TeacherCacheError", "decode", "encode", "expected_shapes", "file_sha256", "hash64",
           "load_manifest", "read_key_hashes", "read_shard", "shard_tensors", "weights_sha256", "write_shard"]

FORMAT = "clip-kd-teacher-cache/1"
MANIFEST = "manifest.json"
CONFIG = "config.json"
SHARD_DIR = "shards"
STORAGE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "int8": torch.int8}
# |x̂| - 1 a stored, L2-normalised vector may show after dequantisation (verify's sanity bound, per format)
NORM_TOL = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2, "int8": 6e-2}


def hash64(text: str) -> int:
    """Stable signed 64-bit hash of a string (blake2b); Python's hash() is salted per process."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def caption_hash(caption) -> int:
    """hash64 of a sample's caption, or of its K captions joined by U+001F (one caption: the same as before)."""
    return hash64(caption if isinstance(caption, str) else "\x1f".join(caption))


def weights_sha256(model: nn.Module) -> str:
    """sha256 over a model's state_dict (names, shapes, fp32 values): the same weights give the same hash whatever
    file format or precision they were loaded from."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def encode(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 L2-normalised vectors (last dim) -> (stored tensor, per-vector float32 scale or None)."""
    x = x.detach().float().cpu()
    if dtype == "int8":
        scale = (x.abs().amax(dim=-1) / 127.0).clamp_min(1e-12)
        q = torch.round(x / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
        return q.contiguous(), scale.contiguous()
    if dtype not in STORAGE_DTYPES:
        raise UsageError(f"unknown cache dtype {dtype!r} (choose from {', '.join(STORAGE_DTYPES)})")
    return x.to(STORAGE_DTYPES[dtype]).contiguous(), None


def decode(stored: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Stored vectors -> float32, re-normalised (the storage rounding changes the norm, not the direction)."""
    x = stored.float()
    if scale is not None:
        x = x * scale.float().unsqueeze(-1)
    return F.normalize(x, dim=-1)


def shard_tensors(keys: Sequence[str], captions_hash: torch.Tensor, source_size: torch.Tensor, views: torch.Tensor,
                  text: Sequence[torch.Tensor], image: Sequence[torch.Tensor], dtype: str,
                  caption_count: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one shard (see the module docstring) from fp32 normalised embeddings. With several captions
    per sample, text/<m> is [n, C, D] (C the shard's most captions; a sample with fewer repeats its last one) and
    `caption_count` [n] says how many are real."""
    n = len(keys)
    out = {
        "key_hash": torch.tensor([hash64(k) for k in keys], dtype=torch.int64),
        "caption_hash": captions_hash.to(torch.int64).reshape(n),
        "source_size": source_size.to(torch.int32).reshape(n, 2),
        "views": views.to(torch.int32).reshape(n, views.shape[-2], 5),
    }
    k = out["views"].shape[1]
    if caption_count is not None:
        out["caption_count"] = caption_count.to(torch.int32).reshape(n)
    for m, (t, v) in enumerate(zip(text, image)):
        shape = (n, t.shape[-1]) if caption_count is None else (n, t.shape[-2], t.shape[-1])
        out[f"text/{m}"], ts = encode(t.reshape(shape), dtype)
        out[f"image/{m}"], vs = encode(v.reshape(n, k, v.shape[-1]), dtype)
        if ts is not None:
            out[f"text_scale/{m}"], out[f"image_scale/{m}"] = ts, vs
    return {k: v.contiguous() for k, v in out.items()}


def write_shard(path: str, keys: Sequence[str], tensors: dict[str, torch.Tensor], dtype: str) -> dict:
    """Serialise one shard atomically; returns its record (file, samples, bytes, sha256)."""
    from safetensors.torch import save

    # one metadata entry: safetensors writes a multi-entry map in random order, and shards must be reproducible
    meta = {"teacher_cache": json.dumps({"format": FORMAT, "dtype": dtype, "keys": list(keys)})}
    data = save(tensors, metadata=meta)
    write_bytes(path, data)
    return {"file": os.path.basename(path), "samples": len(keys), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def read_shard(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors and the metadata ({format, dtype, keys}) of one shard file (verify, tests)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        raw = (f.metadata() or {}).get("teacher_cache")
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        meta = {}
    return tensors, meta if isinstance(meta, dict) else {}


def load_manifest(cache_dir: str) -> dict:
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.isdir(cache_dir):
        raise TeacherCacheError(f"teacher cache {cache_dir} does not exist (build it with python -m "
                                f"training.cache_teacher)")
    if not os.path.isfile(path):
        partial = os.path.isfile(os.path.join(cache_dir, CONFIG))
        raise TeacherCacheError(f"{cache_dir} has no {MANIFEST}" + (
            ": the cache build did not finish; re-run the same python -m training.cache_teacher command to complete "
            "it" if partial else ": not a teacher cache"))
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as exc:
        raise TeacherCacheError(f"cannot read {path}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TeacherCacheError(f"{path} is not a {FORMAT} manifest (format: "
                                f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if not manifest.get("complete"):
        raise TeacherCacheError(f"{path} marks an unfinished cache; re-run the cache_teacher command to complete it")
    return manifest


def expected_shapes(manifest: dict, n: int, captions: int = 1) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors of a shard of n samples; `captions` > 1: its samples' most captions (the shard record's)."""
    k = int(manifest["augmentation"]["views"])
    dtype = manifest["storage"]["dtype"]
    shapes = {"key_hash": ((n,), torch.int64), "caption_hash": ((n,), torch.int64),
              "source_size": ((n, 2), torch.int32), "views": ((n, k, 5), torch.int32)}
    per_text = (n,) if captions == 1 else (n, captions)
    if captions > 1:
        shapes["caption_count"] = ((n,), torch.int32)
    for m, t in enumerate(manifest["teachers"]):
        d = int(t["embed_dim"])
        shapes[f"text/{m}"] = ((*per_text, d), STORAGE_DTYPES[dtype])
        shapes[f"image/{m}"] = ((n, k, d), STORAGE_DTYPES[dtype])
        if dtype == "int8":
            shapes[f"text_scale/{m}"] = (per_text, torch.float32)
            shapes[f"image_scale/{m}"] = ((n, k), torch.float32)
    return shapes


def read_key_hashes(path: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.get_tensor("key_hash").numpy()

"""Checking a cache: one shard (size, sha256, tensors, keys, norms, crop boxes), a whole cache (`--verify`), and
the start-up check of a training run where every rank checks its share."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..errors import TeacherCacheError, first_line
from .format import (
    NORM_TOL,
    SHARD_DIR,
    expected_shapes,
    file_sha256,
    hash64,
    load_manifest,
    read_key_hashes,
    read_shard,
)


def check_shard(cache_dir: str, manifest: dict, record: dict, checksum: bool = True, content: bool = True) -> list[str]:
    """Problems of one shard: missing, wrong size, sha256 mismatch, wrong tensors, keys, non-finite or bad norms."""
    name = record.get("name", record.get("file"))
    path = os.path.join(cache_dir, SHARD_DIR, record["file"])
    if not os.path.isfile(path):
        return [f"shard {name}: file {path} is missing"]
    size = os.path.getsize(path)
    if size != record["bytes"]:
        return [f"shard {name}: {size} bytes, the manifest records {record['bytes']} (truncated or replaced)"]
    if checksum:
        digest = file_sha256(path)
        if digest != record["sha256"]:
            return [f"shard {name}: sha256 {digest[:12]}… does not match the manifest's {record['sha256'][:12]}… "
                    f"(corrupt file)"]
    if not content:
        return []
    try:
        tensors, meta = read_shard(path)
    except Exception as exc:  # noqa: BLE001 - a damaged header raises library-specific errors
        return [f"shard {name}: unreadable ({first_line(exc)})"]
    n = int(record["samples"])
    problems = []
    for key, (shape, dtype) in expected_shapes(manifest, n, int(record.get("captions", 1))).items():
        t = tensors.get(key)
        if t is None:
            problems.append(f"shard {name}: tensor {key} is missing")
        elif tuple(t.shape) != shape or t.dtype != dtype:
            problems.append(f"shard {name}: {key} is {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}")
    if problems:
        return problems
    keys = meta.get("keys")
    if not isinstance(keys, list) or len(keys) != n:
        return [f"shard {name}: its key list does not hold {n} keys"]
    if [hash64(k) for k in keys] != tensors["key_hash"].tolist():
        problems.append(f"shard {name}: key hashes do not match its keys")
    dtype = manifest["storage"]["dtype"]
    for m in range(len(manifest["teachers"])):
        for kind in ("text", "image"):
            stored = tensors[f"{kind}/{m}"]
            x = stored.float() * (tensors[f"{kind}_scale/{m}"].unsqueeze(-1) if dtype == "int8" else 1.0)
            if not torch.isfinite(x).all():
                problems.append(f"shard {name}: non-finite values in {kind}/{m}")
            elif n and (x.norm(dim=-1) - 1).abs().max() > NORM_TOL[dtype]:
                problems.append(f"shard {name}: {kind}/{m} holds vectors that are not L2-normalised")
    views = tensors["views"]
    sizes = tensors["source_size"].unsqueeze(1)
    if n and ((views[..., 2] <= 0).any() or (views[..., 3] <= 0).any() or (views[..., 0] < 0).any()
              or (views[..., 1] < 0).any() or (views[..., 0] + views[..., 2] > sizes[..., 1]).any()
              or (views[..., 1] + views[..., 3] > sizes[..., 0]).any()):
        problems.append(f"shard {name}: crop boxes outside their source images")
    return problems


def verify_cache(cache_dir: str, checksum: bool = True, content: bool = True, threads: int = 4) -> tuple[bool, str]:
    """Check a whole cache; returns (ok, one-line summary)."""
    try:
        manifest = load_manifest(cache_dir)
        shards = manifest["shards"]
        counts = manifest["counts"]
        expected_shapes(manifest, 0)
    except TeacherCacheError as exc:
        return False, f"FAILED {cache_dir}: {exc}"
    except (KeyError, TypeError, ValueError) as exc:
        return False, f"FAILED {cache_dir}: malformed manifest ({type(exc).__name__}: {exc})"
    problems: list[str] = []
    with ThreadPoolExecutor(max(1, threads)) as pool:  # hashlib releases the GIL: shards hash in parallel
        for found in pool.map(lambda r: check_shard(cache_dir, manifest, r, checksum, content), shards):
            problems += found
    total = sum(int(r["samples"]) for r in shards)
    if total != counts.get("samples") or len(shards) != counts.get("shards"):
        problems.append(f"counts: the shards hold {total} samples in {len(shards)} shards, the manifest says "
                        f"{counts.get('samples')} in {counts.get('shards')}")
    if content and not problems:
        hashes = np.concatenate([read_key_hashes(os.path.join(cache_dir, SHARD_DIR, r["file"])) for r in shards]
                                or [np.zeros(0, np.int64)])
        if len(np.unique(hashes)) != len(hashes):
            problems.append(f"{len(hashes) - len(np.unique(hashes))} duplicate sample keys across shards")
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return False, f"FAILED {cache_dir}: {problems[0]}{more}"
    size = sum(int(r["bytes"]) for r in shards)
    names = ",".join(t["name"] for t in manifest["teachers"])
    return True, (f"OK {cache_dir}: {total} samples in {len(shards)} shards, {manifest['augmentation']['views']} "
                  f"view(s), teacher {names}, {manifest['storage']['dtype']}, {size / 2**20:.1f} MiB "
                  f"({size / max(total, 1):.0f} B/sample), checksums {'verified' if checksum else 'not checked'}")


def verify_shards_distributed(cache_dir: str, manifest: dict, mode: str) -> None:
    """Every rank checks its share of the shards (sha256 with --cache-verify checksum); all ranks fail together."""
    from .. import distributed

    rank, world = distributed.world_info()
    mine = manifest["shards"][rank::world]
    checksum = mode == "checksum"
    with ThreadPoolExecutor(4) as pool:
        problems = [p for found in pool.map(lambda r: check_shard(cache_dir, manifest, r, checksum, content=False),
                                            mine) for p in found]
    flag = torch.tensor([float(bool(problems))])
    if world > 1 and torch.distributed.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
        flag = flag.cuda()
    failed = distributed.reduce_sum(flag)
    if problems:
        raise TeacherCacheError(f"teacher cache {problems[0]}; check it with python -m training.cache_teacher "
                                f"--verify {cache_dir}")
    if float(failed.item()) > 0:
        raise TeacherCacheError(f"a teacher cache shard failed its check on another rank (python -m "
                                f"training.cache_teacher --verify {cache_dir})")

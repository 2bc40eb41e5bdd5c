"""Teacher-embedding cache: the on-disk format, its writer, reader, manifest, verification and lookup by key.

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

Training joins batches to the cache by sample key (`TeacherCache.sample_entry`, called from `make_sample`), replays
the stored crop so the student sees exactly the view the teacher embedded, and `CachedTeacher` stands in for the
frozen teacher in `train.teacher_outputs`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.transforms import ViewParams
from .errors import UsageError, WorkerUsageError

FORMAT = "clip-kd-teacher-cache/1"
MANIFEST = "manifest.json"
CONFIG = "config.json"
SHARD_DIR = "shards"
STORAGE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "int8": torch.int8}
MISSING_REASON = "not_in_teacher_cache"
# |x̂| - 1 a stored, L2-normalised vector may show after dequantisation (verify's sanity bound, per format)
_NORM_TOL = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2, "int8": 6e-2}

log = logging.getLogger(__name__)


class TeacherCacheError(WorkerUsageError):
    """A cache problem: one line, exit 2 (also when raised in a DataLoader worker and re-raised by torch)."""


class SampleNotCached(LookupError):
    """A training sample whose key is not in the cache, under --cache-missing skip.

    The CSV loader leaves uncached rows out of each epoch's order up front (`TeacherCache.contains_keys`) and counts
    them; the WebDataset loader treats an exception from `make_sample` carrying `skip_reason` like a bad image: the
    sample is replaced by the next one of the stream and counted in the batch's `skipped` dict.
    """

    skip_reason = MISSING_REASON


# ---- small helpers -------------------------------------------------------------------------------------------------
def hash64(text: str) -> int:
    """Stable signed 64-bit hash of a string (blake2b); Python's hash() is salted per process."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def weights_sha256(model: nn.Module) -> str:
    """sha256 over a model's state_dict (names, shapes, fp32 values): the same weights give the same hash whatever
    file format or precision they were loaded from."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's 0600 would hide a shared cache from other users


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename: a reader never sees a half-written file."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


# ---- storage formats -----------------------------------------------------------------------------------------------
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
                  text: Sequence[torch.Tensor], image: Sequence[torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """The tensors of one shard (see the module docstring) from fp32 normalised embeddings."""
    n = len(keys)
    out = {
        "key_hash": torch.tensor([hash64(k) for k in keys], dtype=torch.int64),
        "caption_hash": captions_hash.to(torch.int64).reshape(n),
        "source_size": source_size.to(torch.int32).reshape(n, 2),
        "views": views.to(torch.int32).reshape(n, views.shape[-2], 5),
    }
    k = out["views"].shape[1]
    for m, (t, v) in enumerate(zip(text, image)):
        out[f"text/{m}"], ts = encode(t.reshape(n, t.shape[-1]), dtype)
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
    write_bytes_atomic(path, data)
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


# ---- manifest and verification -------------------------------------------------------------------------------------
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


def _expected_shapes(manifest: dict, n: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    k = int(manifest["augmentation"]["views"])
    dtype = manifest["storage"]["dtype"]
    shapes = {"key_hash": ((n,), torch.int64), "caption_hash": ((n,), torch.int64),
              "source_size": ((n, 2), torch.int32), "views": ((n, k, 5), torch.int32)}
    for m, t in enumerate(manifest["teachers"]):
        d = int(t["embed_dim"])
        shapes[f"text/{m}"] = ((n, d), STORAGE_DTYPES[dtype])
        shapes[f"image/{m}"] = ((n, k, d), STORAGE_DTYPES[dtype])
        if dtype == "int8":
            shapes[f"text_scale/{m}"] = ((n,), torch.float32)
            shapes[f"image_scale/{m}"] = ((n, k), torch.float32)
    return shapes


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
        return [f"shard {name}: unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"]
    n = int(record["samples"])
    problems = []
    for key, (shape, dtype) in _expected_shapes(manifest, n).items():
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
            elif n and (x.norm(dim=-1) - 1).abs().max() > _NORM_TOL[dtype]:
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
        _expected_shapes(manifest, 0)
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
        hashes = np.concatenate([_read_key_hashes(os.path.join(cache_dir, SHARD_DIR, r["file"])) for r in shards]
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


def _read_key_hashes(path: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.get_tensor("key_hash").numpy()


# ---- reading -------------------------------------------------------------------------------------------------------
class TeacherCache:
    """Lookup by sample key. Lives in `DataTransforms.teacher_cache` and so in every DataLoader worker.

    The index is three numpy arrays (sorted key hashes, shard ids, rows): 16 bytes per sample, shared copy-on-write
    by forked workers. Shard files are memory-mapped lazily per process; a lookup reads one row.
    """

    def __init__(self, cache_dir: str, manifest: dict | None = None, missing: str = "error", views: str = "auto"):
        self.dir = cache_dir
        self.manifest = manifest if manifest is not None else load_manifest(cache_dir)
        if missing not in ("error", "skip"):
            raise UsageError(f"--cache-missing {missing!r}: expected error or skip")
        self.missing = missing
        self.num_views = int(self.manifest["augmentation"]["views"])
        self.view_choices = self._view_choices(views)
        self.dtype = self.manifest["storage"]["dtype"]
        self.members = len(self.manifest["teachers"])
        self.embed_dims = [int(t["embed_dim"]) for t in self.manifest["teachers"]]
        self.files = [os.path.join(cache_dir, SHARD_DIR, r["file"]) for r in self.manifest["shards"]]
        hashes, shard_ids, rows = [], [], []
        for i, path in enumerate(self.files):
            h = _read_key_hashes(path)
            hashes.append(h)
            shard_ids.append(np.full(len(h), i, np.int32))
            rows.append(np.arange(len(h), dtype=np.int32))
        hashes_all = np.concatenate(hashes) if hashes else np.zeros(0, np.int64)
        order = np.argsort(hashes_all, kind="stable")
        self._hashes = hashes_all[order]
        self._shards = np.concatenate(shard_ids)[order] if hashes else np.zeros(0, np.int32)
        self._rows = np.concatenate(rows)[order] if hashes else np.zeros(0, np.int32)
        if len(self._hashes) > 1 and (self._hashes[1:] == self._hashes[:-1]).any():
            raise TeacherCacheError(f"{cache_dir} holds duplicate sample keys (run python -m training.cache_teacher "
                                    f"--verify {cache_dir})")
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._hashes)

    def __getstate__(self):  # open mmaps do not travel to spawned workers; they reopen lazily
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _view_choices(self, views: str) -> list[int]:
        k = self.num_views
        if views == "auto":
            return list(range(1, k)) if k > 1 else [0]
        if views == "augmented":
            if k < 2:
                raise UsageError("--cache-views augmented: the cache holds only the centre view (built with --views 1)")
            return list(range(1, k))
        if views == "all":
            return list(range(k))
        if views == "centre":
            return [0]
        raise UsageError(f"--cache-views {views!r}: expected auto, augmented, all or centre")

    def locate(self, key: str) -> tuple[int, int] | None:
        h = hash64(key)
        i = int(np.searchsorted(self._hashes, h))
        if i < len(self._hashes) and self._hashes[i] == h:
            return int(self._shards[i]), int(self._rows[i])
        return None

    def __contains__(self, key: str) -> bool:
        return self.locate(key) is not None

    def contains_keys(self, keys: Sequence[str]) -> np.ndarray:
        """Boolean mask: which of `keys` the cache holds (one vectorised lookup for a whole CSV)."""
        h = np.fromiter((hash64(k) for k in keys), np.int64, len(keys))
        if not len(self._hashes):
            return np.zeros(len(h), bool)
        i = np.minimum(np.searchsorted(self._hashes, h), len(self._hashes) - 1)
        return self._hashes[i] == h

    def _handle(self, shard: int):
        if self._pid != os.getpid():  # forked worker: do not share the parent's file handles
            self._handles, self._pid = {}, os.getpid()
        f = self._handles.get(shard)
        if f is None:
            from safetensors import safe_open

            if len(self._handles) >= 64:
                self._handles.clear()
            f = self._handles[shard] = safe_open(self.files[shard], framework="pt")
        return f

    def _row(self, f, name: str, row: int) -> torch.Tensor:
        return f.get_slice(name)[row:row + 1][0]

    def entry(self, key: str) -> dict | None:
        """Everything stored for one key (embeddings decoded to fp32 unit vectors), or None when absent."""
        where = self.locate(key)
        if where is None:
            return None
        shard, row = where
        f = self._handle(shard)
        out = {"views": self._row(f, "views", row), "source_size": self._row(f, "source_size", row),
               "caption_hash": int(self._row(f, "caption_hash", row)), "text": [], "image": []}
        for m in range(self.members):
            scale_t = self._row(f, f"text_scale/{m}", row) if self.dtype == "int8" else None
            scale_v = self._row(f, f"image_scale/{m}", row) if self.dtype == "int8" else None
            out["text"].append(decode(self._row(f, f"text/{m}", row), scale_t))
            out["image"].append(decode(self._row(f, f"image/{m}", row), scale_v))
        return out

    def sample_entry(self, key: str, caption: str, image_size: tuple[int, int], rng: random.Random | None) -> dict:
        """What `make_sample` attaches to a training sample: the view to replay and the teacher's embeddings of it.

        The view index is drawn from `rng` (the sample rng: a function of (seed, epoch, key)), so resume is exact.
        Raises TeacherCacheError when the sample does not match what was cached, SampleNotCached (skip) or
        TeacherCacheError (error) when the key is absent.
        """
        e = self.entry(key)
        if e is None:
            if self.missing == "skip":
                raise SampleNotCached(f"sample {key!r} is not in the teacher cache {self.dir}")
            raise TeacherCacheError(f"sample {key!r} is not in the teacher cache {self.dir}: rebuild the cache for "
                                    f"this data (python -m training.cache_teacher) or pass --cache-missing skip")
        w, h = (int(v) for v in image_size)
        cw, ch = (int(v) for v in e["source_size"])
        if (w, h) != (cw, ch):
            raise TeacherCacheError(f"sample {key!r}: the image decodes to {w}x{h} but the teacher cache was built from "
                                    f"a {cw}x{ch} image; the source images changed (resized?) since the cache was "
                                    f"built, so its crop boxes and embeddings do not fit: rebuild the cache")
        if hash64(caption) != e["caption_hash"]:
            raise TeacherCacheError(f"sample {key!r}: its caption differs from the one the cached text embedding was "
                                    f"computed from ({caption[:60]!r}); the data changed since the cache was built: "
                                    f"rebuild the cache")
        rng = rng if rng is not None else random.Random(key)
        k = self.view_choices[rng.randrange(len(self.view_choices))] if len(self.view_choices) > 1 \
            else self.view_choices[0]
        return {"view": ViewParams.from_tuple(e["views"][k].tolist()),
                "teacher_image_emb": torch.cat([v[k] for v in e["image"]]),
                "teacher_text_emb": torch.cat(e["text"]),
                "teacher_view_index": torch.tensor(k, dtype=torch.long)}


class CachedTeacher(nn.Module):
    """Stands in for `models.Teacher` when training from a cache: dims and logit scales from the manifest, and the
    embeddings from the batch (`teacher_image_emb`/`teacher_text_emb`, members concatenated)."""

    def __init__(self, manifest: dict):
        super().__init__()
        self.names = [t["name"] for t in manifest["teachers"]]
        self._dims = [int(t["embed_dim"]) for t in manifest["teachers"]]
        self.scales = [float(t["logit_scale"]) for t in manifest["teachers"]]
        self.requires_grad_(False)

    @property
    def embed_dims(self) -> list[int]:
        return list(self._dims)

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, image, text):
        raise TeacherCacheError("training from --teacher-cache: the batch carries no cached teacher embeddings "
                                "(teacher_image_emb/teacher_text_emb); this data source does not join the cache")

    def outputs_from_batch(self, batch: dict, device: torch.device) -> dict[str, list[torch.Tensor]]:
        """The online teacher's output format: per member L2-normalised features and exp(logit_scale)."""
        image = batch["teacher_image_emb"].to(device, torch.float32, non_blocking=True)
        text = batch["teacher_text_emb"].to(device, torch.float32, non_blocking=True)
        return {"image_features": list(image.split(self._dims, dim=-1)),
                "text_features": list(text.split(self._dims, dim=-1)),
                "logit_scales": [torch.tensor(s, dtype=torch.float32, device=device) for s in self.scales]}


# ---- training-time opening and checks --------------------------------------------------------------------------------
def _arch_matches(given: str, entry: dict) -> bool:
    stem = os.path.splitext(os.path.basename(given))[0]
    return given in (entry.get("name"), entry.get("arch")) or stem in (entry.get("name"), entry.get("arch"))


def check_teacher_flags(args, manifest: dict, cache_dir: str) -> None:
    """--teacher/--teacher-pretrained given with --teacher-cache must describe the cached teacher(s)."""
    teachers = manifest["teachers"]
    names = list(getattr(args, "teacher_list", None) or [])
    cached = ",".join(t["name"] for t in teachers)
    if names:
        if len(names) != len(teachers) or not all(_arch_matches(n, t) for n, t in zip(names, teachers)):
            raise TeacherCacheError(f"--teacher {','.join(names)} differs from the teacher in the cache {cache_dir} "
                                    f"({cached}): drop --teacher or use a cache built for it")
    weights = list(getattr(args, "teacher_pretrained_list", None) or [])
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


def check_data_flags(args, manifest: dict, cache: TeacherCache) -> None:
    """Catch a data source the cache cannot serve before training starts (per-sample checks back this up)."""
    data = manifest.get("data", {})
    from .data import infer_dataset_type

    kind = args.dataset_type if args.dataset_type != "auto" else infer_dataset_type(args.train_data)
    if kind != data.get("dataset_type"):
        raise TeacherCacheError(f"the teacher cache {cache.dir} was built from {data.get('dataset_type')} data but "
                                f"training reads {kind} data: sample keys would not match")
    skip = cache.missing == "skip"
    if kind == "csv":
        cached = {c["stem"]: c for c in data.get("csv", [])}
        for path in [p for p in args.train_data.split(",") if p]:
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
        if (getattr(args, "wds_key_format", "auto") or "auto") != data.get("key_format", "auto"):
            raise TeacherCacheError(f"--wds-key-format {getattr(args, 'wds_key_format', 'auto')} differs from the "
                                    f"cache's {data.get('key_format')}: sample keys would not match")
        from .data.webdataset import expand_sources, shard_stem

        cached = set(data.get("shards", []))
        wanted = [u for urls in expand_sources(args.train_data) for u in urls]
        absent = [u for u in wanted if shard_stem(u) not in cached]
        if absent and not skip:
            raise TeacherCacheError(f"{len(absent)} of {len(wanted)} training shards were not cached (first: "
                                    f"{absent[0]}); rebuild the cache or pass --cache-missing skip")
        if absent:
            log.warning("teacher cache: %d of %d shards were not cached: their samples will be skipped", len(absent),
                        len(wanted))


def _verify_shards_distributed(cache_dir: str, manifest: dict, mode: str) -> None:
    """Every rank checks its share of the shards (sha256 with --cache-verify checksum); all ranks fail together."""
    from . import distributed

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


def open_for_training(args) -> tuple[TeacherCache, CachedTeacher]:
    """--teacher-cache: load and check the manifest, flags and shards; returns the reader and the stand-in teacher."""
    from .distill import resolve_spec

    cache_dir = args.teacher_cache
    spec = resolve_spec(getattr(args, "distill", None), getattr(args, "recipe", None),
                        getattr(args, "distill_overrides", None))
    if any(name == "feat" and s.active for name, s in spec.terms.items()):
        raise TeacherCacheError("the feat term needs the teacher's intermediate tokens, which a teacher-embedding "
                                "cache does not store: drop feat from --distill or train without --teacher-cache")
    if getattr(args, "fsdp_shard_teacher", False):
        raise TeacherCacheError("--fsdp-shard-teacher has nothing to shard with --teacher-cache (no teacher is built)")
    manifest = load_manifest(cache_dir)
    check_teacher_flags(args, manifest, cache_dir)
    _verify_shards_distributed(cache_dir, manifest, getattr(args, "cache_verify", "checksum") or "checksum")
    cache = TeacherCache(cache_dir, manifest, missing=getattr(args, "cache_missing", "error") or "error",
                         views=getattr(args, "cache_views", "auto") or "auto")
    check_data_flags(args, manifest, cache)
    logging.info("teacher cache %s: %d samples, %d view(s) (training on views %s), teacher %s, %s; no teacher is "
                 "built or run", cache_dir, len(cache), cache.num_views, cache.view_choices,
                 ",".join(t["name"] for t in manifest["teachers"]), cache.dtype)
    return cache, CachedTeacher(manifest)

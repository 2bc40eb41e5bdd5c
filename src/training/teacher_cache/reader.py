"""Reading a cache during training: `TeacherCache` (lookup by sample key, the data layer's `TeacherJoin`) and
`CachedTeacher` (stands in for the frozen teacher)."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..data.transforms import ViewParams
from ..errors import TeacherCacheError, UsageError
from .format import SHARD_DIR, SampleNotCached, caption_hash, decode, hash64, load_manifest, read_key_hashes


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
            h = read_key_hashes(path)
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
        """Everything stored for one key (embeddings decoded to fp32 unit vectors), or None when absent: per member
        "image" [K, D], "captions" [C, D] (every caption's text embedding) and "text" [D] (the first caption's)."""
        where = self.locate(key)
        if where is None:
            return None
        shard, row = where
        f = self._handle(shard)
        out = {"views": self._row(f, "views", row), "source_size": self._row(f, "source_size", row),
               "caption_hash": int(self._row(f, "caption_hash", row)), "text": [], "captions": [], "image": []}
        several = "caption_count" in f.keys()  # a shard with several captions per sample: text rows [C, D]
        out["caption_count"] = int(self._row(f, "caption_count", row)) if several else 1
        for m in range(self.members):
            scale_t = self._row(f, f"text_scale/{m}", row) if self.dtype == "int8" else None
            scale_v = self._row(f, f"image_scale/{m}", row) if self.dtype == "int8" else None
            text = decode(self._row(f, f"text/{m}", row), scale_t)
            out["captions"].append(text if several else text.unsqueeze(0))  # [C, D], one row per caption
            out["text"].append(out["captions"][-1][0])  # the first caption's [D]
            out["image"].append(decode(self._row(f, f"image/{m}", row), scale_v))
        return out

    def sample_entry(self, key: str, caption, image_size: tuple[int, int], rng: random.Random | None,
                     caption_indices: Sequence[int] = (0,)) -> dict:
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
        if caption_hash(caption) != e["caption_hash"]:
            shown = caption if isinstance(caption, str) else " | ".join(caption)
            raise TeacherCacheError(f"sample {key!r}: its caption differs from the one the cached text embedding was "
                                    f"computed from ({shown[:60]!r}); the data changed since the cache was built: "
                                    f"rebuild the cache")
        rng = rng if rng is not None else random.Random(key)
        k = self.view_choices[rng.randrange(len(self.view_choices))] if len(self.view_choices) > 1 \
            else self.view_choices[0]
        return {"view": ViewParams.from_tuple(e["views"][k].tolist()),
                "teacher_image_emb": torch.cat([v[k] for v in e["image"]]),
                "teacher_view_index": torch.tensor(k, dtype=torch.long),
                # the drawn caption(s): the same draw as the tokens of the batch (make_sample)
                **{"teacher_text_emb" + ("" if i == 0 else f"_{i + 1}"): torch.cat([t[c] for t in e["captions"]])
                   for i, c in enumerate(caption_indices)}}


class CachedTeacher(nn.Module):
    """Stands in for `models.Teacher` when training from a cache: dims and logit scales from the manifest, and the
    embeddings from the batch (`teacher_image_emb`/`teacher_text_emb`, members concatenated)."""

    def __init__(self, manifest: dict):
        super().__init__()
        self.names = [t["name"] for t in manifest["teachers"]]
        self._dims = [int(t["embed_dim"]) for t in manifest["teachers"]]
        self.scales = [float(t["logit_scale"]) for t in manifest["teachers"]]
        # SigLIP teachers' logit bias (None: a CLIP teacher, or a cache written before biases were recorded)
        self.logit_biases = [None if t.get("logit_bias") is None else float(t["logit_bias"])
                             for t in manifest["teachers"]]
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
        text = batch["teacher_text_emb"]
        if "teacher_text_emb_2" in batch:  # --captions-per-step 2: both captions' rows [2B], as the live teacher
            text = torch.cat([text, batch["teacher_text_emb_2"]])
        text = text.to(device, torch.float32, non_blocking=True)
        return {"image_features": list(image.split(self._dims, dim=-1)),
                "text_features": list(text.split(self._dims, dim=-1)),
                "logit_scales": [torch.tensor(s, dtype=torch.float32, device=device) for s in self.scales],
                "logit_biases": [None if b is None else torch.tensor(b, dtype=torch.float32, device=device)
                                 for b in self.logit_biases]}

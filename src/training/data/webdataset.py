"""WebDataset (tar shard) data: `get_wds_dataset(args, transforms, epoch, is_train, floor=False) -> DataInfo`.

Shards
    `--train-data` is a brace pattern (`/data/cc3m/{00000..00331}.tar`); several sources are joined with `::`
    (`/data/cc3m/{00000..00331}.tar::/data/cc12m/{00000..01242}.tar`). A shard is a local path, a `file://` URL,
    a `pipe:` command writing the tar to stdout (`pipe:aws s3 cp s3://b/00000.tar -`) or an fsspec URL
    (`s3://`, `gs://`, `https://`, ...; needs `fsspec` plus the protocol's package, e.g. `s3fs`).

Samples
    Tar members are grouped by key (`00000123.jpg`, `00000123.txt`, `00000123.json` -> one sample) as webdataset
    does. The image is the first of jpg/jpeg/png/webp; the caption is the member whose extension is
    `--wds-caption-key` (default `txt`) or, failing that, that field of the `.json` member (dotted paths allowed,
    e.g. `--wds-caption-key caption`). One decode feeds both student and teacher preprocessing (`make_sample`).

Keys (`batch["key"]`, what a teacher-embedding cache joins on), chosen by `--wds-key-format`:
    `auto` (default): the tar `__key__` with one source, `<source>/<__key__>` with several (source = name of the
    folder holding that source's shards, `src<i>` where two sources share a folder name); `key`: always the bare
    `__key__`; `shard`: `[<source>/]<shard stem>/<__key__>` for datasets whose keys repeat across shards.

Epochs (not resampled)
    Per (seed, epoch) the shard list is permuted; reader g = rank + world_size * worker gets shards g, g + R, ...
    (R = world_size * workers), so no two readers open the same shard in an epoch. Every reader yields exactly
    `num_batches / workers` batches: a reader that runs out starts another pass over its own shards (re-shuffled),
    and one with more data stops early, as open_clip's `with_epoch` does. Samples are shuffled through a
    per-reader buffer (`--wds-shuffle-buffer`) seeded by (seed, epoch, rank, worker); the buffer is flushed at the
    end of each pass so no sample repeats before the reader has seen all of its samples.

Epochs (`--dataset-resampled`)
    Every reader draws shards with replacement (weighted by `--train-data-upsampling-factors`, per shard as in
    open_clip) from a stream seeded by (seed, epoch, start_batch, rank, worker).

Bad data never stops training and never shrinks a batch. `batch["skipped"]` counts problems by reason (since that
    worker's previous batch): `missing_image`, `missing_caption`, `bad_caption`, `corrupt_image` (decode or
    preprocessing failed), `truncated_tar` (tar ends early or has a broken header; counted once per read of the
    shard), `unreadable_shard` (cannot be opened). Per shard: `info.extra["skipped_by_shard"]` accumulates
    `{"<reason>:<shard url>": count}` in the main process, each worker logs its first few skips with shard and key,
    and the end of every epoch logs one line with the shards that had problems. Under `--teacher-cache DIR
    --cache-missing skip` shards the cache does not list are left out up front (logged; none left is an error), and
    a sample the cache lacks is skipped as `not_in_teacher_cache`. A reader whose whole pass over its shards gave
    no usable sample stops with a one-line NoDataError instead of looping.

Exact mid-epoch resume (not resampled)
    Batch b comes from worker b % workers (DataLoader round robin). Each batch carries the number of samples its
    worker has taken from its shuffled stream so far; `info.extra["state_fn"]()` returns these per-worker
    positions. After `info.extra["load_state_fn"](state)` and `info.set_epoch(epoch, start_batch)` each worker
    regenerates its deterministic stream, skips its recorded position (local tars: headers only, no image reads or
    decodes), and the workers are re-labelled so batch `start_batch` comes next: the run continues with exactly the
    samples, in the same order, an uninterrupted run would have produced. Without a matching state
    (`set_epoch(epoch, start_batch)` alone) each worker instead replays its first batches by decoding images (no
    preprocessing) to find how far it got: still exact unless preprocessing (not decoding) rejected a sample.

Checkpoint contract
    `state_fn()` -> this rank's small picklable dict {format, resampled, seed, epoch, batch (batches of the epoch
    consumed), rank, world_size, workers, num_shards, batch_size, positions (per worker, int or None)}. Positions
    differ between ranks, so keep one per rank (e.g. `all_gather_object` into a list). `load_state_fn(state)` accepts
    that list (indexed by rank), a {rank: dict} mapping or one dict; it is used by the next `set_epoch` whose
    (epoch, start_batch) and set-up match it, and ignored with a warning otherwise (the workers then replay).

Evaluation (`is_train=False`, `--val-data`)
    Every shard once, split between the DataLoader workers only (not ranks), unshuffled, last batch partial;
    `num_batches` from `--val-num-samples` or sizes.json.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import re
import tarfile
from collections import Counter
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from training.data.common import DataInfo, DataTransforms, collate, make_sample, sample_rng
from training.errors import UsageError, WorkerUsageError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SKIP_REASONS = ("missing_image", "missing_caption", "bad_caption", "corrupt_image", "truncated_tar",
                "unreadable_shard")
STATE_FORMAT = "clip-kd-wds/1"
DEFAULT_SHUFFLE_BUFFER = 5000  # open_clip's _SAMPLE_SHUFFLE_SIZE
DEFAULT_SHUFFLE_INITIAL = 1000  # open_clip's _SAMPLE_SHUFFLE_INITIAL
_POS = "__wds_pos__"  # per-batch (role, samples taken from the stream, batch index); popped by WdsLoader
_SHARD_SKIPS = "__wds_skipped_by_shard__"  # per-batch {"<reason>:<shard url>": n}; popped by WdsLoader
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_LOG_FIRST = 5  # log this many skips per reason and worker, then count silently
_PROTOCOL_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp",
                      "https": "aiohttp", "az": "adlfs", "abfs": "adlfs", "hf": "huggingface_hub"}


class NoDataError(WorkerUsageError):
    """A reader's shards hold no usable sample, so it cannot produce its share of batches (one line, exit 2, also
    when raised in a DataLoader worker and re-raised by torch)."""


# ---- shard lists -------------------------------------------------------------------------------------------------
def url_scheme(url: str) -> str:
    """'' for local paths, 'pipe' for pipe: commands, otherwise the URL scheme (file, s3, gs, https, ...)."""
    if url.startswith("pipe:"):
        return "pipe"
    scheme = urlparse(url).scheme
    return "" if len(scheme) <= 1 else scheme  # one letter: a Windows drive


def _url_path(url: str) -> str:
    """The path-like part of a shard URL (for pipe: commands, the first token that names a .tar)."""
    scheme = url_scheme(url)
    if scheme == "pipe":
        tokens = [t for t in url[5:].split() if ".tar" in t]
        return _url_path(tokens[0]) if tokens else url[5:]
    if scheme == "":
        return url
    return url2pathname(urlparse(url).path) if scheme == "file" else urlparse(url).path


def _local_path(url: str) -> str | None:
    scheme = url_scheme(url)
    if scheme == "":
        return url
    if scheme == "file":
        return url2pathname(urlparse(url).path)
    return None


def shard_stem(url: str) -> str:
    base = os.path.basename(_url_path(url).rstrip("/"))
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def expand_sources(spec: str) -> list[list[str]]:
    """'a/{0..2}.tar::b/{0..1}.tar' -> [[a/0.tar, a/1.tar, a/2.tar], [b/0.tar, b/1.tar]]."""
    sources = [s.strip() for s in spec.split("::") if s.strip()]
    if not sources:
        raise UsageError(f"no shards in --train-data/--val-data {spec!r}")
    return [list(braceexpand.braceexpand(s)) for s in sources]


def source_names(sources: list[list[str]]) -> list[str]:
    """Key prefixes of the sources: the folder name of each source's first shard (src<i> when they collide)."""
    names = [os.path.basename(os.path.dirname(_url_path(urls[0]).rstrip("/"))) or f"src{i}"
             for i, urls in enumerate(sources)]
    return [n if names.count(n) == 1 else f"src{i}" for i, n in enumerate(names)]


def make_key(raw_key: str, url: str, source_name: str | None, key_format: str) -> str:
    """The stable sample key of tar `__key__` raw_key read from shard url (see module docstring)."""
    key = raw_key
    if key_format == "shard":
        key = f"{shard_stem(url)}/{key}"
    if key_format != "key" and source_name is not None:
        key = f"{source_name}/{key}"
    return key


def parse_upsampling_factors(value, num_sources: int) -> list[float] | None:
    if value in (None, ""):
        return None
    parts = value.split("::") if isinstance(value, str) else list(value)
    try:
        factors = [float(p) for p in parts]
    except ValueError:
        raise UsageError(f"--train-data-upsampling-factors {value!r}: expected numbers joined with '::'") from None
    if len(factors) != num_sources:
        raise UsageError(f"--train-data-upsampling-factors has {len(factors)} values but --train-data has "
                         f"{num_sources} '::'-joined sources")
    if any(f <= 0 or not math.isfinite(f) for f in factors):
        raise UsageError("--train-data-upsampling-factors must be positive")
    return factors


def check_url_support(urls: list[str]) -> None:
    """Fail early, with what to install, when a shard URL needs a package that is missing."""
    for scheme in sorted({url_scheme(u) for u in urls} - {"", "file", "pipe"}):
        package = _PROTOCOL_PACKAGES.get(scheme, f"the fsspec implementation of {scheme}://")
        try:
            import fsspec
        except ImportError:
            raise UsageError(f"{scheme}:// shards need fsspec and {package} (pip install fsspec {package}, or "
                             f"pip install 'clip-kd[remote]'); or use a pipe: URL such as "
                             f"'pipe:aws s3 cp s3://bucket/00000.tar -'") from None
        try:
            fsspec.get_filesystem_class(scheme)
            if scheme in ("http", "https"):
                import aiohttp  # noqa: F401  (fsspec's http filesystem imports it lazily)
        except (ImportError, ValueError) as e:
            raise UsageError(f"cannot read {scheme}:// shards: {e} (pip install {package}); or use a pipe: URL "
                             f"such as 'pipe:curl -sfL URL'") from None


def _read_json(url: str):
    local = _local_path(url)
    if local is not None:
        if not os.path.exists(local):
            return None
        with open(local) as f:
            return json.load(f)
    if url_scheme(url) == "pipe":
        return None
    try:
        import fsspec

        with fsspec.open(url, "r") as f:
            return json.load(f)
    except Exception:  # noqa: BLE001 - sizes.json is optional
        return None


def dataset_size(sources: list[list[str]]) -> int | None:
    """Sum of sizes.json entries ({shard basename: count}) beside each source's shards; None if any is unknown."""
    total = 0
    cache: dict[str, Any] = {}
    for urls in sources:
        for url in urls:
            path = _url_path(url)
            folder = os.path.dirname(path)
            if url_scheme(url) not in ("", "file", "pipe"):
                folder = url[: len(url) - len(os.path.basename(path))].rstrip("/")
            if folder not in cache:
                sizes_url = (folder + "/sizes.json") if folder else "sizes.json"
                cache[folder] = _read_json(sizes_url)
            sizes = cache[folder]
            name = os.path.basename(path)
            if not isinstance(sizes, dict) or name not in sizes:
                return None
            total += int(sizes[name])
    return total


def _rank_world(args) -> tuple[int, int]:
    rank, world = getattr(args, "rank", None), getattr(args, "world_size", None)
    if rank is not None and world is not None:
        return int(rank), int(world)
    from training.distributed import detect_world, world_info

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return world_info()
    rank, _, world = detect_world()
    return rank, world


# ---- reading tars ------------------------------------------------------------------------------------------------
class _Lazy:
    """A member's bytes left on disk (fast-forward over local shards reads headers only)."""

    __slots__ = ("path", "offset", "size")

    def __init__(self, path: str, offset: int, size: int):
        self.path, self.offset, self.size = path, offset, size


def _open_stream(url: str):
    if url_scheme(url) == "pipe":
        import webdataset

        return webdataset.gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


class _Reader:
    """Per-worker reading state: skip counters, the lazy switch and open handles for lazy members."""

    def __init__(self):
        self.lazy = False
        self.skipped: Counter = Counter()
        self.logged: Counter = Counter()
        self._handles: dict[str, Any] = {}

    def skip(self, reason: str, url: str, detail: str = "") -> None:
        self.skipped[f"{reason}:{url}"] += 1
        if self.lazy:
            return
        self.logged[reason] += 1
        if self.logged[reason] <= _LOG_FIRST:
            more = " (further ones are only counted)" if self.logged[reason] == _LOG_FIRST else ""
            log.warning("webdataset: skipped %s in %s%s%s", reason, url, f": {detail}" if detail else "", more)

    def load(self, files: dict) -> dict:
        if not any(isinstance(v, _Lazy) for v in files.values()):
            return files
        out = {}
        for ext, value in files.items():
            if isinstance(value, _Lazy):
                f = self._handles.get(value.path)
                if f is None:
                    if len(self._handles) > 8:
                        self.close()
                    f = self._handles[value.path] = open(value.path, "rb")
                f.seek(value.offset)
                value = f.read(value.size)
            out[ext] = value
        return out

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def members(self, url: str):
        """Yield (member name, bytes or _Lazy) of one shard; problems are counted, never raised."""
        path = _local_path(url)
        if path is not None and path.endswith((".gz", ".tgz", ".bz2", ".xz")):
            path = None  # compressed: offsets are not file offsets, stream it
        fileobj = tf = None
        yielded = 0
        try:
            try:
                if path is not None:
                    fileobj = open(path, "rb")
                    total = os.fstat(fileobj.fileno()).st_size
                    tf = tarfile.open(fileobj=fileobj, mode="r:")
                else:
                    local = _local_path(url)
                    fileobj = open(local, "rb") if local is not None else _open_stream(url)
                    tf = tarfile.open(fileobj=fileobj, mode="r|*")
            except Exception as e:  # noqa: BLE001
                self.skip("unreadable_shard", url, repr(e))
                return
            while True:
                try:
                    member = tf.next()
                    tf.members = []  # tarfile keeps every header otherwise
                    if member is None:
                        if path is not None:  # tarfile stops silently at a broken or cut header
                            fileobj.seek(tf.offset)
                            end = fileobj.read(tarfile.BLOCKSIZE)
                            if len(end) < tarfile.BLOCKSIZE or end.count(0) != len(end):
                                self.skip("truncated_tar", url, f"no end-of-archive marker at byte {tf.offset}")
                        return
                    if not member.isreg():
                        continue
                    if path is not None:
                        if member.offset_data + member.size > total:
                            self.skip("truncated_tar", url, f"{member.name} ends past the end of the file")
                            return
                        if self.lazy:
                            data = _Lazy(path, member.offset_data, member.size)
                        else:
                            fileobj.seek(member.offset_data)
                            data = fileobj.read(member.size)
                    else:
                        data = tf.extractfile(member).read()
                except Exception as e:  # noqa: BLE001
                    self.skip("truncated_tar" if yielded else "unreadable_shard", url, repr(e))
                    return
                yielded += 1
                yield member.name, data
        finally:
            for obj in (tf, fileobj):
                if obj is not None:
                    try:
                        obj.close()
                    except Exception:  # noqa: BLE001,S110 - a failed pipe also complains on close
                        pass

    def samples(self, url: str, shard_index: int):
        """Group one shard's members into raw samples (key, shard index, {extension: bytes or _Lazy})."""
        key, files = None, None
        for name, data in self.members(url):
            base = os.path.basename(name)
            if base.startswith(("__", "._")):
                continue
            m = _KEY_RE.match(name)
            if m is None:
                continue
            prefix, suffix = m.group(1), m.group(2).lower()
            if files is None or prefix != key or suffix in files:
                if files:
                    yield key, shard_index, files
                key, files = prefix, {}
            files[suffix] = data
        if files:
            yield key, shard_index, files


def _buffered_shuffle(items, rng: random.Random, bufsize: int, initial: int):
    """Deterministic shuffle buffer; flushes at the end of `items`."""
    buf: list = []
    n = 0
    for item in items:
        buf.append(item)
        n += 1
        if len(buf) < bufsize and (len(buf) < initial or n % 2):
            continue  # fill to `initial`, then grow by one every second item up to `bufsize`
        k = rng.randrange(len(buf))
        buf[k], buf[-1] = buf[-1], buf[k]
        yield buf.pop()
    rng.shuffle(buf)
    yield from buf


# ---- the dataset -------------------------------------------------------------------------------------------------
class WdsDataset(IterableDataset):
    """Batches of dicts (DESIGN.md) from tar shards; one instance per split, re-configured by `set_epoch`."""

    def __init__(self, shards: list[str], shard_sources: list[int], source_names_: list[str] | None,
                 transforms: DataTransforms, *, is_train: bool, resampled: bool, weights: list[float] | None,
                 batch_size: int, workers: int, rank: int, world_size: int, seed: int, worker_batches: int | None,
                 caption_key: str, key_format: str, shuffle_buffer: int, epoch: int):
        super().__init__()
        self.shards, self.shard_sources, self.source_names = shards, shard_sources, source_names_
        self.transforms, self.is_train, self.resampled, self.weights = transforms, is_train, resampled, weights
        self.batch_size, self.workers, self.rank, self.world_size = batch_size, workers, rank, world_size
        self.seed, self.worker_batches = seed, worker_batches
        self.caption_key, self.key_format = caption_key, key_format
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.shuffle_initial = min(DEFAULT_SHUFFLE_INITIAL, self.shuffle_buffer)
        self.epoch, self.start_batch = epoch, 0
        self.resume_raw: list[int | None] = [None] * self.num_roles  # per role: stream position to skip to

    @property
    def num_roles(self) -> int:
        return max(1, self.workers)

    def role_batches_done(self, role: int, start_batch: int | None = None) -> int:
        """Batches of this epoch that worker `role` produced before batch `start_batch`."""
        s = self.start_batch if start_batch is None else start_batch
        return max(0, -(-(s - role) // self.num_roles))

    # -- streams --
    def _reader_shards(self, role: int) -> list[int]:
        if not self.is_train:  # evaluation: all shards once, split between workers only
            return list(range(len(self.shards)))[role::self.num_roles]
        order = list(range(len(self.shards)))
        random.Random(f"wds-shards:{self.seed}:{self.epoch}").shuffle(order)
        readers = self.world_size * self.num_roles
        return order[self.rank + self.world_size * role::readers]

    def _resampled_shards(self, role: int):
        """Shard indices drawn with replacement, forever (seeded by seed, epoch, start_batch, rank, role)."""
        rng = random.Random(f"wds-resample:{self.seed}:{self.epoch}:{self.start_batch}:{self.rank}:{role}")
        population = range(len(self.shards))
        while True:
            yield from rng.choices(population, weights=self.weights, k=64)

    def _items(self, shard_ids, reader: _Reader, counter: list[int]):
        for shard in shard_ids:
            got = 0
            for item in reader.samples(self.shards[shard], shard):
                got += 1
                yield item
            counter[0] += got
            counter[1] = 0 if got else counter[1] + 1
            if self.resampled and counter[1] > max(100, 4 * len(self.shards)):
                raise NoDataError(f"rank {self.rank}: {counter[1]} shard draws in a row gave no samples; check "
                                  f"--train-data")

    def _raw_stream(self, role: int, reader: _Reader, progress: dict | None = None):
        """The reader's sample stream after shuffling (deterministic for seed, epoch, rank, role).

        `progress` ({"good": usable samples so far, "checking": bool}) is kept by the consumer: a pass in which every
        sample was skipped (e.g. none is in the teacher cache) raises NoDataError instead of looping forever."""
        if not self.is_train:
            yield from self._items(self._reader_shards(role), reader, [0, 0])
            return
        rng = random.Random(f"wds-shuffle:{self.seed}:{self.epoch}:{self.start_batch if self.resampled else 0}:"
                            f"{self.rank}:{role}")
        if self.resampled:
            yield from _buffered_shuffle(self._items(self._resampled_shards(role), reader, [0, 0]), rng,
                                         self.shuffle_buffer, self.shuffle_initial)
            return
        # pass after pass over this reader's shards, one shuffle buffer per pass flushed at its end, so no sample
        # repeats before every sample of the reader was seen once
        mine = self._reader_shards(role)
        names = [self.shards[i] for i in mine]
        shown = f"{names[:4]}{'...' if len(names) > 4 else ''}"
        p = 0
        while True:
            order = list(mine)
            if p:
                random.Random(f"wds-pass:{self.seed}:{self.epoch}:{self.rank}:{role}:{p}").shuffle(order)
            counter = [0, 0]
            good, checked = (progress["good"], progress["checking"]) if progress is not None else (None, False)
            reasons: Counter = Counter()
            yield from _buffered_shuffle(self._items(order, reader, counter), rng, self.shuffle_buffer,
                                         self.shuffle_initial)
            if counter[0] == 0:
                raise NoDataError(f"rank {self.rank} worker {role}: no readable sample in its shards {shown}")
            # the consumer has decoded every item of the pass by now (it asked for the next one)
            if checked and progress["checking"] and progress["good"] == good:
                for name, count in reader.skipped.items():
                    reasons[name.split(":", 1)[0]] += count
                why = ", ".join(f"{k} {v}" for k, v in reasons.items()) or "every sample skipped"
                raise NoDataError(f"rank {self.rank} worker {role}: a whole pass over its shards {shown} gave no "
                                  f"usable sample ({counter[0]} read; skipped: {why})")
            p += 1

    # -- decoding --
    def _caption(self, files: dict, reader: _Reader, url: str) -> str | None:
        key = self.caption_key
        try:
            if key in files:
                text = files[key].decode("utf-8")
            elif "json" in files:
                value = json.loads(files["json"])
                for part in key.split("."):
                    value = value.get(part) if isinstance(value, dict) else None
                text = value if isinstance(value, str) else None
            else:
                text = None
        except (UnicodeDecodeError, ValueError) as e:
            reader.skip("bad_caption", url, repr(e))
            return None
        if text is None or not text.strip():
            reader.skip("missing_caption", url)
            return None
        return text.strip()

    def _decode(self, item, reader: _Reader, preprocess: bool = True):
        raw_key, shard, files = item
        url = self.shards[shard]
        files = reader.load(files)
        ext = next((e for e in IMAGE_EXTS if e in files), None)
        if ext is None:
            reader.skip("missing_image", url, raw_key)
            return None
        caption = self._caption(files, reader, url)
        if caption is None:
            return None
        try:
            with Image.open(io.BytesIO(files[ext])) as im:
                image = im.convert("RGB")
            source = None if self.source_names is None else self.source_names[self.shard_sources[shard]]
            key = make_key(raw_key, url, source, self.key_format)
            if not preprocess:
                cache = self.transforms.teacher_cache if self.is_train else None
                # replay must reject what make_sample would: a key the cache lacks (--cache-missing skip)
                return None if cache is not None and cache.missing == "skip" and key not in cache else True
            rng = sample_rng(self.seed, self.epoch, key) if self.is_train else None
            return make_sample(image, caption, key, self.transforms, self.is_train, rng)
        except UsageError:  # e.g. a key missing from the teacher cache in error mode: never train on wrong targets
            raise
        except Exception as e:  # noqa: BLE001 - any decode/preprocessing failure is a skipped sample
            reader.skip(getattr(e, "skip_reason", None) or "corrupt_image", url, f"{raw_key}: {e!r}")
            return None

    # -- iteration --
    def __iter__(self):
        info = get_worker_info()
        wid = info.id if info is not None else 0
        role = (wid + self.start_batch) % self.num_roles if self.is_train else wid
        reader = _Reader()
        try:
            yield from self._iter_role(role, reader)
        finally:
            reader.close()

    def _iter_role(self, role: int, reader: _Reader):
        progress = {"good": 0, "checking": False}  # no check while fast-forwarding (nothing is decoded)
        stream = self._raw_stream(role, reader, progress)
        taken, done = 0, 0
        if self.is_train and not self.resampled:
            done = self.role_batches_done(role)
            target = self.resume_raw[role]
            if target is not None:  # exact: skip the recorded stream position without reading images
                reader.lazy = True
                for _ in range(target):
                    next(stream)
                taken = target
                reader.lazy = False
            elif done:  # no recorded position: replay `done` batches, decoding only to find bad samples
                good = 0
                while good < done * self.batch_size:
                    taken += 1
                    good += self._decode(next(stream), reader, preprocess=False) is not None
            reader.skipped.clear()
        elif self.is_train:
            done = self.role_batches_done(role)
        progress["checking"] = True
        target_batches = self.worker_batches if self.is_train else None
        batch: list = []
        while target_batches is None or done < target_batches:
            item = next(stream, None)
            if item is None:
                break
            taken += 1
            sample = self._decode(item, reader)
            if sample is None:
                continue
            progress["good"] += 1
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self._finish(batch, reader, role, taken, done)
                batch, done = [], done + 1
        if batch and target_batches is None:
            yield self._finish(batch, reader, role, taken, done)
        elif target_batches is not None and done < target_batches:
            raise NoDataError(f"rank {self.rank} worker {role}: shard stream ended after {done} of "
                              f"{target_batches} batches")

    @staticmethod
    def _finish(samples: list, reader: _Reader, role: int, taken: int, index: int) -> dict:
        batch = collate(samples)
        by_reason: Counter = Counter()
        for name, count in reader.skipped.items():
            by_reason[name.split(":", 1)[0]] += count
        batch["skipped"] = dict(by_reason)
        batch[_SHARD_SKIPS] = dict(reader.skipped)
        reader.skipped.clear()
        batch[_POS] = (role, taken, index)
        return batch


class WdsLoader:
    """What `DataInfo.dataloader` holds: a fresh torch DataLoader per epoch, stripping positions off batches."""

    def __init__(self, dataset: WdsDataset, num_batches: int, num_samples: int):
        self.dataset = dataset
        self.num_batches, self.num_samples = num_batches, num_samples
        self.skipped_by_shard: Counter = Counter()  # "<reason>:<shard url>" -> count, over the run
        self.reset()

    def reset(self) -> None:
        """Positions as of the epoch's start batch: recorded, 0 for workers that have not started, else unknown."""
        ds = self.dataset
        self.positions: list[int | None] = [
            raw if raw is not None else (0 if ds.role_batches_done(r) == 0 else None)
            for r, raw in enumerate(ds.resume_raw)]
        self.batches_seen = ds.start_batch if ds.is_train else 0

    def __len__(self) -> int:
        if not self.dataset.is_train:
            return self.num_batches
        return max(0, self.num_batches - self.dataset.start_batch)

    def __iter__(self):
        ds = self.dataset
        self.reset()
        generator = torch.Generator()
        generator.manual_seed(hash((ds.seed, ds.epoch, ds.start_batch, ds.rank)) % (2 ** 62))
        kwargs: dict[str, Any] = {}
        if ds.workers > 0:
            kwargs.update(prefetch_factor=2, persistent_workers=False)
        loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=ds.workers, generator=generator,
                            pin_memory=torch.cuda.is_available(), **kwargs)
        epoch_skips: Counter = Counter()
        for batch in loader:
            role, taken, _ = batch.pop(_POS)
            epoch_skips.update(batch.pop(_SHARD_SKIPS))
            self.positions[role] = taken
            self.batches_seen += 1
            yield batch
        self.skipped_by_shard.update(epoch_skips)
        if epoch_skips:
            top = ", ".join(f"{name} x{count}" for name, count in epoch_skips.most_common(10))
            more = f" and {len(epoch_skips) - 10} more" if len(epoch_skips) > 10 else ""
            log.warning("webdataset: epoch %d (rank %d) skipped %d: %s%s", ds.epoch, ds.rank,
                        sum(epoch_skips.values()), top, more)


def _state_fn(ds: WdsDataset, loader: WdsLoader):
    def state() -> dict:
        return {"format": STATE_FORMAT, "resampled": ds.resampled, "seed": ds.seed, "epoch": ds.epoch,
                "batch": loader.batches_seen, "rank": ds.rank, "world_size": ds.world_size,
                "workers": ds.num_roles, "num_shards": len(ds.shards), "batch_size": ds.batch_size,
                "positions": list(loader.positions)}
    return state


def _select_state(state, rank: int):
    """This rank's entry of a saved state: a dict, a list indexed by rank, or a {rank: dict} mapping."""
    if state is None:
        return None
    if isinstance(state, (list, tuple)):
        return state[rank] if rank < len(state) else None
    if isinstance(state, dict) and "format" not in state:
        return state.get(rank, state.get(str(rank)))
    return state


def _cached_shards(shards: list[str], shard_sources: list[int], sources: list[list[str]], cache):
    """--cache-missing skip: leave out the shards the teacher cache has no entry for (by stem, as the start-up check
    does), so no reader spends an epoch skipping a whole shard, or loops over shards it can never use."""
    listed = cache.manifest.get("data", {}).get("shards")
    if not listed:  # a cache that does not list its shards: every sample is checked on its own
        return shards, shard_sources, sources
    listed = set(listed)
    keep = [shard_stem(u) in listed for u in shards]
    if not any(keep):
        from training.teacher_cache import TeacherCacheError

        raise TeacherCacheError(f"none of the {len(shards)} training shards is in the teacher cache {cache.dir} "
                                f"(--cache-missing skip leaves nothing to train on): rebuild it for this data with "
                                f"python -m training.cache_teacher")
    if all(keep):
        return shards, shard_sources, sources
    left = [u for u, k in zip(shards, keep) if not k]
    log.warning("webdataset: %d of %d shards are not in the teacher cache (first: %s); --cache-missing skip leaves "
                "them out of every epoch", len(left), len(shards), left[0])
    kept = {u for u, k in zip(shards, keep) if k}
    return ([u for u, k in zip(shards, keep) if k], [s for s, k in zip(shard_sources, keep) if k],
            [[u for u in urls if u in kept] for urls in sources])


def get_wds_dataset(args, transforms: DataTransforms, epoch: int = 0, is_train: bool = True,
                    floor: bool = False) -> DataInfo:
    spec = args.train_data if is_train else getattr(args, "val_data", None)
    if not spec:
        raise UsageError("--train-data is required" if is_train else "--val-data is required")
    sources = expand_sources(spec)
    shards = [u for urls in sources for u in urls]
    shard_sources = [i for i, urls in enumerate(sources) for _ in urls]
    check_url_support(shards)
    local = [_local_path(u) for u in shards]
    missing = [u for u, p in zip(shards, local) if p is not None and not os.path.exists(p)]
    if missing and len(missing) == sum(p is not None for p in local):
        raise UsageError(f"no shard of {spec!r} exists (first: {missing[0]})")
    if missing:
        log.warning("webdataset: %d of %d shards do not exist (first: %s); they are skipped and counted",
                    len(missing), len(shards), missing[0])
    key_format = getattr(args, "wds_key_format", "auto") or "auto"
    if key_format not in ("auto", "key", "shard"):
        raise UsageError(f"--wds-key-format {key_format!r}: expected auto, key or shard")
    names = source_names(sources) if len(sources) > 1 and key_format != "key" else None  # of ALL sources: keys
    cache = transforms.teacher_cache if is_train else None
    if cache is not None and cache.missing == "skip":
        shards, shard_sources, sources = _cached_shards(shards, shard_sources, sources, cache)

    resampled = bool(getattr(args, "dataset_resampled", False)) and is_train
    factors = parse_upsampling_factors(getattr(args, "train_data_upsampling_factors", None), len(sources)) \
        if is_train else None
    if factors is not None and not resampled:
        raise UsageError("--train-data-upsampling-factors needs --dataset-resampled (sampling shards with "
                         "replacement)")
    weights = [factors[s] for s in shard_sources] if factors else None

    rank, world_size = _rank_world(args) if is_train else (0, 1)
    workers = max(0, int(getattr(args, "workers", 0) or 0))
    batch_size = int(args.batch_size)
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    readers = world_size * max(1, workers)
    if is_train and not resampled and len(shards) < readers:
        fit = len(shards) // world_size
        fix = (f"use --workers {fit} or fewer" if fit >= 1 else "use fewer processes") + \
            ", split the data into more shards (python -m training.data.convert --samples-per-shard N) " \
            "or add --dataset-resampled"
        raise UsageError(f"--train-data has {len(shards)} shards but {world_size} process(es) x {max(1, workers)} "
                         f"worker(s) = {readers} readers each need their own shard: {fix}")

    if is_train:
        num_samples = getattr(args, "train_num_samples", None) or dataset_size(sources)
        if not num_samples:
            raise UsageError("WebDataset training needs --train-num-samples (no sizes.json with every shard was "
                             "found beside the shards)")
        round_fn = math.floor if floor else math.ceil
        global_batch = batch_size * world_size
        num_batches = round_fn(num_samples / global_batch)
        worker_batches = round_fn(num_batches / max(1, workers))
        if worker_batches < 1:
            raise UsageError(f"--train-num-samples {num_samples} gives no full batch of {batch_size} x "
                             f"{world_size} process(es) x {max(1, workers)} worker(s)")
        num_batches = worker_batches * max(1, workers)
        num_samples = num_batches * global_batch
        if not resampled and len(shards) % readers:
            log.info("webdataset: %d shards over %d readers: some readers hold one shard more and the others "
                     "repeat samples to fill their share of each epoch", len(shards), readers)
    else:
        worker_batches = None
        num_samples = getattr(args, "val_num_samples", None) or dataset_size(sources) or 0
        num_batches = math.ceil(num_samples / batch_size)

    dataset = WdsDataset(
        shards, shard_sources, names, transforms, is_train=is_train, resampled=resampled, weights=weights,
        batch_size=batch_size, workers=workers, rank=rank, world_size=world_size,
        seed=int(getattr(args, "seed", 0) or 0), worker_batches=worker_batches,
        caption_key=getattr(args, "wds_caption_key", "txt") or "txt", key_format=key_format,
        shuffle_buffer=int(getattr(args, "wds_shuffle_buffer", DEFAULT_SHUFFLE_BUFFER) or DEFAULT_SHUFFLE_BUFFER),
        epoch=epoch)
    loader = WdsLoader(dataset, num_batches, num_samples)
    pending: dict[str, Any] = {"state": None}

    def load_state(state) -> None:
        pending["state"] = _select_state(state, rank)

    def set_epoch(new_epoch: int, start_batch: int = 0) -> None:
        if start_batch < 0 or (is_train and start_batch > num_batches):
            raise ValueError(f"start_batch {start_batch} outside 0..{num_batches}")
        dataset.epoch, dataset.start_batch = int(new_epoch), int(start_batch) if is_train else 0
        dataset.resume_raw = [None] * dataset.num_roles
        state, pending["state"] = pending["state"], None
        if not is_train or resampled or dataset.start_batch == 0:
            loader.reset()
            return
        expected = {"format": STATE_FORMAT, "resampled": False, "seed": dataset.seed, "epoch": dataset.epoch,
                    "batch": dataset.start_batch, "rank": rank, "world_size": world_size, "workers": dataset.num_roles,
                    "num_shards": len(shards), "batch_size": batch_size}
        if isinstance(state, dict) and all(state.get(k) == v for k, v in expected.items()):
            positions = list(state.get("positions") or [])
            dataset.resume_raw = [p if isinstance(p, int) else None for p in positions][:dataset.num_roles]
            dataset.resume_raw += [None] * (dataset.num_roles - len(dataset.resume_raw))
        else:
            why = "no data state was loaded" if state is None else "the saved data state does not match " + str(
                {k: (state.get(k) if isinstance(state, dict) else None, v) for k, v in expected.items()
                 if not isinstance(state, dict) or state.get(k) != v})
            log.warning("webdataset: resuming epoch %d at batch %d: %s; workers replay their first batches "
                        "by decoding images (slower, exact unless preprocessing rejected a sample)",
                        dataset.epoch, dataset.start_batch, why)
        needs_replay = [r for r in range(dataset.num_roles)
                        if dataset.resume_raw[r] is None and dataset.role_batches_done(r) > 0]
        if needs_replay and state is not None:
            log.info("webdataset: workers %s had no recorded position; they replay by decoding", needs_replay)
        loader.reset()

    info = DataInfo(dataloader=loader, num_batches=num_batches, num_samples=num_samples, set_epoch_fn=set_epoch,
                    extra={"state_fn": _state_fn(dataset, loader), "load_state_fn": load_state, "shards": shards,
                           "resampled": resampled, "skipped_by_shard": loader.skipped_by_shard})
    set_epoch(epoch, 0)
    return info

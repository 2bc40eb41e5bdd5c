"""The WebDataset training/evaluation stream: `get_wds_dataset(data, transforms, seed=...) -> DataInfo`.

Shards and keys: `training.data.wds.urls`; reading tars and captions: `training.data.wds.tar`; resume state:
`training.data.wds.resume`. The behaviour (epochs, bad data, exact resume, evaluation) is described in
`training.data.wds`.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections import Counter
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from training.config import DataConfig
from training.data import datacompdr
from training.data.common import DataInfo, DataTransforms, caption_rng, collate, make_sample, sample_rng
from training.data.tokens import TOKENS_EXT, decode_tokens, stored_token_dirs
from training.data.transforms import ImageDecodeError

from ...errors import NoDataError, TeacherCacheError, UsageError
from .resume import resume_positions, select_state, stream_state
from .tar import TarReader
from .urls import (
    check_url_support,
    dataset_size,
    expand_sources,
    local_path,
    make_key,
    parse_upsampling_factors,
    shard_stem,
    source_names,
)

log = logging.getLogger("training.data.wds")

DEFAULT_SHUFFLE_BUFFER = 5000  # open_clip's _SAMPLE_SHUFFLE_SIZE
DEFAULT_SHUFFLE_INITIAL = 1000  # open_clip's _SAMPLE_SHUFFLE_INITIAL
_POS = "__wds_pos__"  # per-batch (role, samples taken from the stream, batch index); popped by WdsLoader
_SHARD_SKIPS = "__wds_skipped_by_shard__"  # per-batch {"<reason>:<shard url>": n}; popped by WdsLoader


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    from training.distributed import detect_world, world_info

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return world_info()
    rank, _, world = detect_world()
    return rank, world


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
                 caption_key: str, key_format: str, shuffle_buffer: int, epoch: int,
                 datacompdr_widths: list[int] | None = None, token_shards: list[bool] | None = None):
        super().__init__()
        self.shards, self.shard_sources, self.source_names = shards, shard_sources, source_names_
        self.transforms, self.is_train, self.resampled, self.weights = transforms, is_train, resampled, weights
        self.batch_size, self.workers, self.rank, self.world_size = batch_size, workers, rank, world_size
        self.seed, self.worker_batches = seed, worker_batches
        self.caption_key, self.key_format = caption_key, key_format
        self.datacompdr_widths = datacompdr_widths  # DataCompDR layout: teacher embeddings ride in each sample
        self.token_shards = token_shards  # per shard: its stored caption ids are the student's (training.data.tokens)
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

    def _items(self, shard_ids, reader: TarReader, counter: list[int]):
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

    def _raw_stream(self, role: int, reader: TarReader, progress: dict | None = None):
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
    def _decode(self, item, reader: TarReader, preprocess: bool = True):
        raw_key, shard, files = item
        url = self.shards[shard]
        files = reader.load(files)
        decoded = reader.decode(raw_key, files, url, "txt" if self.datacompdr_widths else self.caption_key)
        if decoded is None:
            return None
        image, caption = decoded
        dr = None
        if self.datacompdr_widths:  # also when replaying positions: the same samples must be rejected
            try:
                dr = datacompdr.parse_sample(files, url, self.datacompdr_widths)
            except datacompdr.BadSample as e:
                reader.skip(e.skip_reason, url, f"{raw_key}: {e}")
                return None
            caption = dr["captions"]
        source = None if self.source_names is None else self.source_names[self.shard_sources[shard]]
        key = make_key(raw_key, url, source, self.key_format)
        if not preprocess:
            try:  # the pixels decode lazily (at render time): decode them as the replayed run did
                image.full()
            except ImageDecodeError as e:
                reader.skip(e.skip_reason, url, f"{raw_key}: {e!r}")
                return None
            cache = self.transforms.teacher_cache if self.is_train else None
            # replay must reject what make_sample would: a key the cache lacks (--cache-missing skip)
            return None if cache is not None and cache.missing == "skip" and key not in cache else True
        try:
            rng = sample_rng(self.seed, self.epoch, key) if self.is_train else None
            captions = caption_rng(self.seed, self.epoch, key) if self.is_train else None
            if dr is not None and self.is_train:  # replay a stored augmentation beside its stored embeddings
                entry, chosen = datacompdr.draw(dr, self.transforms.captions_per_step, rng, captions)
                return make_sample(image, caption, key, self.transforms, True, rng, captions, teacher_entry=entry,
                                   caption_indices=chosen)
            tokens = None
            if self.token_shards is not None and self.token_shards[shard] and TOKENS_EXT in files:
                tokens = decode_tokens(files[TOKENS_EXT])
            return make_sample(image, caption, key, self.transforms, self.is_train, rng, captions,
                               caption_tokens=tokens)
        except UsageError:  # e.g. a key missing from the teacher cache in error mode: never train on wrong targets
            raise
        except Exception as e:  # noqa: BLE001 - any preprocessing failure is a skipped sample
            reader.skip(getattr(e, "skip_reason", None) or "corrupt_image", url, f"{raw_key}: {e!r}")
            return None

    # -- iteration --
    def __iter__(self):
        info = get_worker_info()
        wid = info.id if info is not None else 0
        role = (wid + self.start_batch) % self.num_roles if self.is_train else wid
        reader = TarReader()
        try:
            yield from self._iter_role(role, reader)
        finally:
            reader.close()

    def _iter_role(self, role: int, reader: TarReader):
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
    def _finish(samples: list, reader: TarReader, role: int, taken: int, index: int) -> dict:
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
        self._pending_state: dict | None = None  # loaded by load_state_dict, used by the next set_epoch
        self.reset()

    # -- checkpoint contract (training.data.wds.resume) --
    def _setup(self) -> dict:
        ds = self.dataset
        return {"resampled": ds.resampled, "seed": ds.seed, "epoch": ds.epoch, "rank": ds.rank,
                "world_size": ds.world_size, "workers": ds.num_roles, "num_shards": len(ds.shards),
                "batch_size": ds.batch_size}

    def state_dict(self) -> dict:
        """This rank's stream positions (they differ between ranks: a checkpoint keeps one per rank)."""
        return stream_state(self._setup(), self.batches_seen, self.positions)

    def load_state_dict(self, states) -> None:
        """The states of all ranks (a list indexed by rank, a {rank: dict} mapping, or this rank's dict); used by
        the next `set_epoch` whose (epoch, start_batch) and set-up match, ignored with a warning otherwise."""
        self._pending_state = select_state(states, self.dataset.rank)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        ds = self.dataset
        if start_batch < 0 or (ds.is_train and start_batch > self.num_batches):
            raise ValueError(f"start_batch {start_batch} outside 0..{self.num_batches}")
        ds.epoch, ds.start_batch = int(epoch), int(start_batch) if ds.is_train else 0
        ds.resume_raw = [None] * ds.num_roles
        state, self._pending_state = self._pending_state, None
        if ds.is_train and not ds.resampled and ds.start_batch > 0:
            expected = {**self._setup(), "batch": ds.start_batch}
            ds.resume_raw = resume_positions(state, expected, ds.num_roles, ds.epoch, ds.start_batch)
            needs_replay = [r for r in range(ds.num_roles)
                            if ds.resume_raw[r] is None and ds.role_batches_done(r) > 0]
            if needs_replay and state is not None:
                log.info("webdataset: workers %s had no recorded position; they replay by decoding", needs_replay)
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


def _cached_shards(shards: list[str], shard_sources: list[int], sources: list[list[str]], cache):
    """--cache-missing skip: leave out the shards the teacher cache has no entry for (by stem, as the start-up check
    does), so no reader spends an epoch skipping a whole shard, or loops over shards it can never use."""
    listed = cache.manifest.get("data", {}).get("shards")
    if not listed:  # a cache that does not list its shards: every sample is checked on its own
        return shards, shard_sources, sources
    listed = set(listed)
    keep = [shard_stem(u) in listed for u in shards]
    if not any(keep):
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


def get_wds_dataset(data: DataConfig, transforms: DataTransforms, *, seed: int, epoch: int = 0, is_train: bool = True,
                    floor: bool = False, rank: int | None = None, world_size: int | None = None) -> DataInfo:
    """The stream of `data.train_data` (or `data.val_data` with is_train=False); rank/world_size default to the
    process group's (or the launcher's environment)."""
    spec = data.train_data if is_train else data.val_data
    if not spec:
        raise UsageError("--train-data is required" if is_train else "--val-data is required")
    sources = expand_sources(spec)
    shards = [u for urls in sources for u in urls]
    shard_sources = [i for i, urls in enumerate(sources) for _ in urls]
    check_url_support(shards)
    local = [local_path(u) for u in shards]
    missing = [u for u, p in zip(shards, local) if p is not None and not os.path.exists(p)]
    if missing and len(missing) == sum(p is not None for p in local):
        raise UsageError(f"no shard of {spec!r} exists (first: {missing[0]})")
    if missing:
        log.warning("webdataset: %d of %d shards do not exist (first: %s); they are skipped and counted",
                    len(missing), len(shards), missing[0])
    key_format = data.wds_key_format or "auto"
    if key_format not in ("auto", "key", "shard"):
        raise UsageError(f"--wds-key-format {key_format!r}: expected auto, key or shard")
    names = source_names(sources) if len(sources) > 1 and key_format != "key" else None  # of ALL sources: keys
    cache = transforms.teacher_cache if is_train else None
    if cache is not None and cache.missing == "skip":
        shards, shard_sources, sources = _cached_shards(shards, shard_sources, sources, cache)

    resampled = bool(data.dataset_resampled) and is_train
    factors = parse_upsampling_factors(data.train_data_upsampling_factors, len(sources)) \
        if is_train else None
    if factors is not None and not resampled:
        raise UsageError("--train-data-upsampling-factors needs --dataset-resampled (sampling shards with "
                         "replacement)")
    weights = [factors[s] for s in shard_sources] if factors else None

    rank, world_size = _rank_world(rank, world_size) if is_train else (0, 1)
    workers = max(0, int(data.workers or 0))
    batch_size = int(data.batch_size)
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
        num_samples = data.train_num_samples or dataset_size(sources)
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
        num_samples = data.val_num_samples or dataset_size(sources) or 0
        num_batches = math.ceil(num_samples / batch_size)

    caption_key = "txt" if data.wds_caption_key is None else data.wds_caption_key  # '': caption-less shards
    token_dirs = stored_token_dirs([local_path(u) for u in shards], transforms.tokenizer, caption_key) \
        if transforms.tokenizer is not None and not data.datacompdr_teachers else set()
    token_shards = [local_path(u) is not None and os.path.dirname(local_path(u)) in token_dirs for u in shards]
    if any(token_shards):
        log.info("webdataset: %d of %d shards carry the student's caption token ids: captions are not tokenised "
                 "again", sum(token_shards), len(shards))
    dataset = WdsDataset(
        shards, shard_sources, names, transforms, is_train=is_train, resampled=resampled, weights=weights,
        batch_size=batch_size, workers=workers, rank=rank, world_size=world_size,
        seed=int(seed or 0), worker_batches=worker_batches, caption_key=caption_key,
        token_shards=token_shards if any(token_shards) else None,
        datacompdr_widths=datacompdr.parse_widths(data.datacompdr_teachers) if is_train else None,
        key_format=key_format, shuffle_buffer=int(data.wds_shuffle_buffer or DEFAULT_SHUFFLE_BUFFER), epoch=epoch)
    loader = WdsLoader(dataset, num_batches, num_samples)
    loader.set_epoch(epoch, 0)
    return DataInfo(dataloader=loader, num_batches=num_batches, num_samples=num_samples, set_epoch_fn=loader.set_epoch,
                    stateful=loader, extra={"shards": shards, "resampled": resampled,
                                            "skipped_by_shard": loader.skipped_by_shard})

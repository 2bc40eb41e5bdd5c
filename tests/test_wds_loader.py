"""WebDataset loader: skips, exact resume, rank/worker disjointness, equal batch counts, determinism, errors."""

import io
import json
import os
import tarfile
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from training.config import DataConfig, section_from
from training.data.common import DataTransforms
from training.data.wds import get_wds_dataset
from training.params import UsageError, parse_args

N_SHARDS, PER_SHARD = 6, 8
CORRUPT, NO_CAPTION, TRUNCATED = (1, 3), (2, 5), 4


def _wds(args, transforms, epoch=0, is_train=True):
    """get_wds_dataset from the flat test settings (the data section plus seed, rank and world size)."""
    return get_wds_dataset(section_from(DataConfig, vars(args)), transforms, seed=args.seed, epoch=epoch,
                           is_train=is_train, rank=vars(args).get("rank"),
                           world_size=vars(args).get("world_size"))



def _jpeg(seed: int, size: int = 20) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_shards(folder, n_shards=N_SHARDS, per_shard=PER_SHARD, bad=True, json_captions=False, prefix="s"):
    """Shards shard-NN.tar of JPEG samples `<prefix>NN_JJJ`; with `bad`, one corrupt image, one sample without a
    caption and one tar cut in half."""
    os.makedirs(folder, exist_ok=True)
    sizes = {}
    for i in range(n_shards):
        path = os.path.join(folder, f"shard-{i:02d}.tar")
        with tarfile.open(path, "w") as tf:
            for j in range(per_shard):
                key = f"{prefix}{i:02d}_{j:03d}"
                corrupt = bad and (i, j) == CORRUPT
                _add(tf, key + ".jpg", b"\xff\xd8\xff\xe0 not a jpeg" if corrupt else _jpeg(i * 1000 + j))
                if bad and (i, j) == NO_CAPTION:
                    continue
                if json_captions:
                    _add(tf, key + ".json", json.dumps({"caption": f"caption {key}", "w": 20}).encode())
                else:
                    _add(tf, key + ".txt", f"caption {key}".encode())
        sizes[os.path.basename(path)] = per_shard
        if bad and i == TRUNCATED:
            with open(path, "rb") as f:
                data = f.read()
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2 + 100])
    with open(os.path.join(folder, "sizes.json"), "w") as f:
        json.dump(sizes, f)
    return os.path.join(folder, "shard-{00.." + f"{n_shards - 1:02d}" + "}.tar")


def _student(image):
    return TF.to_tensor(image.resize((16, 16)))


def _teacher(image):
    return TF.to_tensor(image.resize((12, 12)))


def _tokenize(texts):
    return torch.tensor([[len(t), sum(map(ord, t)) % 1000] for t in texts])


TRANSFORMS = DataTransforms(student_train=_student, student_val=_student, tokenizer=_tokenize)


@pytest.fixture(scope="module")
def shards(module_tmp_path):
    return make_shards(str(module_tmp_path))


def _args(pattern, **kw):
    base = dict(train_data=pattern, val_data=pattern, train_num_samples=40, val_num_samples=None, batch_size=4,
                workers=2, seed=0, dataset_resampled=False, train_data_upsampling_factors=None,
                wds_caption_key="txt", wds_key_format="auto", wds_shuffle_buffer=6, rank=0, world_size=1)
    base.update(kw)
    return SimpleNamespace(**base)


def _run(info, epoch=0, start_batch=0, stop_after=None):
    info.set_epoch(epoch, start_batch)
    keys, skipped, n = [], Counter(), 0
    for batch in info.dataloader:
        assert batch["image"].shape[0] == len(batch["key"])
        keys += batch["key"]
        skipped.update(batch["skipped"])
        n += 1
        if stop_after is not None and n == stop_after:
            break
    return keys, skipped, n


def test_bad_data_is_skipped_counted_by_shard_and_iteration_continues(shards):
    folder = os.path.dirname(shards)
    info = _wds(_args(shards, workers=1), TRANSFORMS, 0, is_train=False)
    keys, skipped, _ = _run(info)
    assert skipped == {"corrupt_image": 1, "missing_caption": 1, "truncated_tar": 1}
    assert info.extra["skipped_by_shard"] == {f"corrupt_image:{folder}/shard-01.tar": 1,
                                              f"missing_caption:{folder}/shard-02.tar": 1,
                                              f"truncated_tar:{folder}/shard-04.tar": 1}
    lost = sum(k.startswith("s04_") for k in keys)
    assert 0 < lost < PER_SHARD
    assert len(keys) == len(set(keys)) == N_SHARDS * PER_SHARD - 2 - (PER_SHARD - lost)
    assert "s01_003" not in keys and "s02_005" not in keys
    # training: full batches every step, bad samples replaced by the next good one, counts totalled
    train = _wds(_args(shards), TRANSFORMS, 0)
    tkeys, tskipped, n = _run(train)
    assert n == train.num_batches == 10 and len(tkeys) == 40 == len(set(tkeys))
    assert sum(train.extra["skipped_by_shard"].values()) == sum(tskipped.values()) > 0


@pytest.mark.parametrize("with_state", [True, False])
def test_exact_mid_epoch_resume_with_two_workers(shards, with_state):
    args = _args(shards, train_num_samples=44, seed=3)  # 11 batches -> 6 per worker, the last one repeats data
    full, _, n = _run(_wds(args, TRANSFORMS, 0), epoch=1)
    assert n == 12 and len(full) == 48
    for stop in (3, 6):
        first = _wds(args, TRANSFORMS, 0)
        before, _, _ = _run(first, epoch=1, stop_after=stop)
        state = first.state_dict()
        assert state["batch"] == stop and state["epoch"] == 1 and len(state["positions"]) == 2
        second = _wds(args, TRANSFORMS, 0)  # a fresh process after `--resume latest`
        if with_state:
            second.load_state_dict([state])  # the checkpoint keeps one state per rank
        assert len(second.dataloader) == second.num_batches  # nothing consumed yet
        after, _, m = _run(second, epoch=1, start_batch=stop)
        assert m == n - stop
        assert before + after == full  # same samples, same order: nothing repeated or dropped


def test_ranks_and_workers_read_disjoint_shards_and_get_equal_batches(shards):
    per_reader, counts = {}, []
    for rank in range(2):
        args = _args(shards, rank=rank, world_size=2, wds_key_format="shard", train_num_samples=24)
        info = _wds(args, TRANSFORMS, 0)
        info.set_epoch(0)
        n = 0
        for b, batch in enumerate(info.dataloader):
            per_reader.setdefault((rank, b % 2), set()).update(k.split("/")[0] for k in batch["key"])
            n += 1
        counts.append((n, info.num_batches))
    assert counts[0] == counts[1] and counts[0][0] == counts[0][1] == 4
    readers = list(per_reader.values())
    assert len(readers) == 4 and all(readers)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not readers[i] & readers[j]


def test_shuffle_is_deterministic_per_seed_and_epoch(shards):
    def order(seed, epoch):
        return _run(_wds(_args(shards, seed=seed), TRANSFORMS, 0), epoch=epoch)[0]

    a = order(0, 0)
    assert a == order(0, 0)
    assert a != order(0, 1) and a != order(1, 0)


def test_resampled_sources_weights_and_fresh_stream_on_resume(tmp_path, shards):
    other = make_shards(str(tmp_path / "cc12m"), n_shards=2, bad=False, json_captions=True, prefix="t")
    args = _args(f"{shards}::{other}", dataset_resampled=True, train_data_upsampling_factors="1::4",
                 wds_caption_key="caption", train_num_samples=32)
    info = _wds(args, TRANSFORMS, 0)
    keys, _, n = _run(info)
    assert n == info.num_batches == 8
    sources = Counter(k.split("/")[0] for k in keys)
    assert set(sources) <= {"wds0", "cc12m"} and sources["cc12m"] > 0  # <source folder>/<__key__>
    again, _, _ = _run(_wds(args, TRANSFORMS, 0))
    assert again == keys
    resumed = [_run(_wds(args, TRANSFORMS, 0), start_batch=3)[0] for _ in range(2)]
    assert resumed[0] == resumed[1] and len(resumed[0]) == 5 * 4


def test_teacher_preprocessing_and_pipe_urls(shards):
    folder = os.path.dirname(shards)
    transforms = DataTransforms(student_train=_student, student_val=_student, tokenizer=_tokenize,
                                teacher_train=_teacher, teacher_val=_teacher, teacher_tokenizer=_tokenize)
    pipe = f"pipe:cat {folder}/shard-0{{0..3}}.tar"
    info = _wds(_args(pipe, workers=0), transforms, 0, is_train=False)
    batch = next(iter(info.dataloader))
    assert batch["image"].shape[1:] == (3, 16, 16) and batch["teacher_image"].shape[1:] == (3, 12, 12)
    assert batch["text"].shape == batch["teacher_text"].shape == (4, 2)
    keys, skipped, _ = _run(info)
    assert len(keys) == 4 * PER_SHARD - 2 and skipped == {"corrupt_image": 1, "missing_caption": 1}
    assert info.extra["skipped_by_shard"][f"corrupt_image:pipe:cat {folder}/shard-01.tar"] == 1


def test_clear_errors(shards, tmp_path):
    with pytest.raises(UsageError, match="6 shards but 2 process.*--workers 3 or fewer"):
        _wds(_args(shards, workers=4, world_size=2), TRANSFORMS, 0)
    with pytest.raises(UsageError, match="--dataset-resampled"):
        _wds(_args(shards, train_data_upsampling_factors="2"), TRANSFORMS, 0)
    with pytest.raises(UsageError, match="s3fs"):
        _wds(_args("s3://bucket/{0..3}.tar"), TRANSFORMS, 0)
    with pytest.raises(UsageError, match="no shard"):
        _wds(_args(str(tmp_path / "{0..3}.tar")), TRANSFORMS, 0)
    no_sizes = make_shards(str(tmp_path / "nosizes"), n_shards=2, bad=False)
    os.remove(str(tmp_path / "nosizes" / "sizes.json"))
    with pytest.raises(UsageError, match="--train-num-samples"):
        _wds(_args(no_sizes, train_num_samples=None, workers=1), TRANSFORMS, 0)
    # sizes.json is enough when --train-num-samples is not given
    sized = _wds(_args(shards, train_num_samples=None, workers=1), TRANSFORMS, 0)
    assert sized.num_samples == N_SHARDS * PER_SHARD


def test_flags_parse():
    args = parse_args(["--dataset-type", "webdataset", "--train-data", "a/{0..9}.tar::b/{0..3}.tar",
                       "--dataset-resampled", "--train-data-upsampling-factors", "1::2", "--wds-caption-key",
                       "caption", "--wds-key-format", "shard", "--wds-shuffle-buffer", "100"])
    assert args.dataset_resampled and args.train_data_upsampling_factors == "1::2"
    assert (args.wds_caption_key, args.wds_key_format, args.wds_shuffle_buffer) == ("caption", "shard", 100)


class _PartialCache:
    """A teacher cache under --cache-missing skip that lacks every sample _001 and _002 of each shard."""

    missing, dir, manifest = "skip", "fake-cache", {}

    def __contains__(self, key):
        return not key.endswith(("_001", "_002"))

    def sample_entry(self, key, caption, size, rng, caption_indices=(0,)):
        from training.teacher_cache import SampleNotCached

        if key not in self:
            raise SampleNotCached(key)
        return {"view": None}


def test_cache_missing_skip_resume_without_state_replays_exactly(shards):
    from training.data.transforms import ImageFormat, PairedViews

    fmt = ImageFormat(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    transforms = DataTransforms(tokenizer=_tokenize, train_views=PairedViews(fmt, None, train=True),
                                val_views=PairedViews(fmt, None, train=False), teacher_cache=_PartialCache())
    args = _args(shards, train_num_samples=32, seed=5)
    full, skipped, n = _run(_wds(args, transforms, 0), epoch=1)
    assert n == 8 and skipped["not_in_teacher_cache"] > 0 and not any(k.endswith(("_001", "_002")) for k in full)
    first = _wds(args, transforms, 0)
    before, _, _ = _run(first, epoch=1, stop_after=3)
    # no saved positions: the workers replay by decoding, and must reject uncached keys as make_sample does
    after, _, _ = _run(_wds(args, transforms, 0), epoch=1, start_batch=3)
    assert before + after == full

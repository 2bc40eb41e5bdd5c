"""CSV loading: bad rows are skipped and counted, batches stay full, order is deterministic and world-size free."""

import argparse
from collections import Counter

import numpy as np
import open_clip
import pytest
import torch

import training  # noqa: F401
from helpers import write_image_csv
from training.config import DataConfig, section_from
from training.data import DataTransforms, get_data
from training.data.csv import GlobalBatchSampler
from training.data.transforms import ImageFormat, PairedViews
from training.params import UsageError


def _args(csv, root, **kw):
    base = dict(train_data=csv, val_data=None, dataset_type="auto", csv_img_key="filepath", csv_caption_key="title",
                csv_separator="\t", data_root=root, batch_size=4, workers=0, seed=0, train_num_samples=None,
                synthetic_num_samples=16)
    base.update(kw)
    return argparse.Namespace(**base)


def _get_data(args, transforms):
    return get_data(section_from(DataConfig, vars(args)), transforms, seed=args.seed)


def _transforms(teacher_size=None):
    student = ImageFormat(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    teacher = ImageFormat(teacher_size, (0.4, 0.4, 0.4), (0.3, 0.3, 0.3)) if teacher_size else None
    tok = open_clip.get_tokenizer("tiny-student")
    return DataTransforms(tokenizer=tok, train_views=PairedViews(student, teacher, train=True),
                          val_views=PairedViews(student, teacher, train=False),
                          teacher_tokenizer=open_clip.get_tokenizer("tiny-teacher") if teacher_size else None)


def test_bad_rows_are_skipped_and_counted(tmp_path):
    root = str(tmp_path)
    csv = write_image_csv(root, n=16, bad={1: "missing", 5: "corrupt", 9: "empty"})
    info = _get_data(_args(csv, root, batch_size=5), _transforms())["train"]
    assert info.extra["dropped_at_load"] == {"empty_caption": 1}
    skipped, keys = {}, []
    for batch in info.dataloader:  # 15 usable rows, 3 batches of 5: every row is visited once
        assert batch["image"].shape == (5, 3, 32, 32)  # bad rows never shrink a batch
        for k, v in batch["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
        keys += batch["key"]
    assert skipped == {"missing_image": 1, "corrupt_image": 1}
    assert "train/9" not in keys and len(keys) == 15


def test_teacher_and_student_see_the_same_view_in_their_own_format(tmp_path):
    root = str(tmp_path)
    csv = write_image_csv(root, n=8, size=48)
    info = _get_data(_args(csv, root), _transforms(teacher_size=40))["train"]
    batch = next(iter(info.dataloader))
    assert batch["image"].shape[-1] == 32 and batch["teacher_image"].shape[-1] == 40
    assert batch["text"].shape[-1] == 24 and batch["teacher_text"].shape[-1] == 32
    # Workers ship uint8 pixels (normalised on the device); compare at a common size: same crop, so nearly the
    # same pixels.
    assert batch["image"].dtype == batch["teacher_image"].dtype == torch.uint8
    s = batch["image"] / 255
    t = torch.nn.functional.interpolate(batch["teacher_image"] / 255, size=32, mode="bilinear", antialias=True)
    assert (s - t).abs().mean() < 0.05


def test_order_is_deterministic_per_epoch_and_resumable():
    a = GlobalBatchSampler(40, 4, 0, 1, seed=3, shuffle=True)
    a.set_epoch(2)
    full = list(a)
    a.set_epoch(2, start_batch=3)
    assert list(a) == full[12:]
    a.set_epoch(3)
    assert list(a) != full


def test_two_ranks_cover_the_single_process_global_batches():
    single = GlobalBatchSampler(40, 8, 0, 1, seed=1, shuffle=True)
    r0 = GlobalBatchSampler(40, 4, 0, 2, seed=1, shuffle=True)
    r1 = GlobalBatchSampler(40, 4, 1, 2, seed=1, shuffle=True)
    s, a, b = list(single), list(r0), list(r1)
    assert len(a) == len(b) == len(s) // 2
    for i in range(len(s) // 8):
        assert s[i * 8:(i + 1) * 8] == a[i * 4:(i + 1) * 4] + b[i * 4:(i + 1) * 4]


def test_missing_csv_and_column_errors(tmp_path):
    with pytest.raises(UsageError, match="data file not found"):
        _get_data(_args(str(tmp_path / "nope.csv"), None), _transforms())
    csv = write_image_csv(str(tmp_path), n=8)
    with pytest.raises(UsageError, match="no column 'caption'"):
        _get_data(_args(csv, str(tmp_path), csv_caption_key="caption"), _transforms())


def test_csv_list_with_root_list(tmp_path):
    a = write_image_csv(str(tmp_path / "a"), n=8, seed=1)
    b = write_image_csv(str(tmp_path / "b"), n=8, seed=2)
    info = _get_data(_args(f"{a},{b}", f"{tmp_path / 'a'},{tmp_path / 'b'}"), _transforms())["train"]
    assert info.num_batches == 4
    assert sum(len(batch["key"]) for batch in info.dataloader) == 16


class _PartialCache:
    """Stands in for a TeacherCache under --cache-missing skip that holds only some keys (no embeddings)."""

    missing, dir = "skip", "fake-cache"

    def __init__(self, keys):
        self.keys = set(keys)

    def contains_keys(self, keys):
        return np.array([k in self.keys for k in keys], bool)

    def sample_entry(self, key, caption, size, rng, caption_indices=(0,)):
        from training.teacher_cache import SampleNotCached

        if key not in self.keys:
            raise SampleNotCached(key)
        return {"view": None}  # no stored view: make_sample draws one


def test_rows_missing_from_the_teacher_cache_are_left_out_and_counted(tmp_path):
    root = str(tmp_path)
    csv = write_image_csv(root, n=16, bad={2: "missing"})
    cached = {f"train/{i}" for i in range(16) if not 3 <= i <= 9}  # a run of 7 uncached rows after row 2
    transforms = _transforms()
    transforms.teacher_cache = _PartialCache(cached)
    info = _get_data(_args(csv, root, batch_size=3), transforms)["train"]
    assert info.num_batches == 3 and info.extra["left_out_per_epoch"] == 7  # 9 cached rows, 3 batches of 3
    for epoch in (0, 1):
        info.set_epoch(epoch)
        keys, skipped = [], Counter()
        for batch in info.dataloader:
            assert len(batch["key"]) == 3
            skipped.update(batch["skipped"])
            keys += batch["key"]
        # the missing image of row 2 is replaced by the next CACHED row (10), never by an uncached one
        assert skipped == {"not_in_teacher_cache": 7, "missing_image": 1}
        assert set(keys) == cached - {"train/2"} and Counter(keys)["train/10"] == 2 and len(keys) == 9


def test_left_out_rows_keep_the_order_and_the_rank_split():
    usable = np.ones(40, bool)
    usable[[3, 4, 5, 17, 30]] = False
    full = list(GlobalBatchSampler(40, 5, 0, 1, seed=1, shuffle=True))
    kept = list(GlobalBatchSampler(40, 5, 0, 1, seed=1, shuffle=True, usable=usable))
    # the same permutation without the left-out rows; the first sample carries the epoch's left-out count
    assert kept[0] == (full[0][0], 0, 5) and [i for i, *_ in kept] == [i for i, _ in full if usable[i]][:35]
    assert len(kept) == 35 and all(len(item) == 2 for item in kept[1:])
    single = GlobalBatchSampler(40, 10, 0, 1, seed=4, shuffle=True, usable=usable)
    ranks = [GlobalBatchSampler(40, 5, r, 2, seed=4, shuffle=True, usable=usable) for r in (0, 1)]
    for s in (single, *ranks):
        s.set_epoch(2)
    s, a, b = list(single), list(ranks[0]), list(ranks[1])
    assert len(s) == 30 and len(a) == len(b) == 15
    for i in range(3):
        assert s[i * 10:(i + 1) * 10] == a[i * 5:(i + 1) * 5] + b[i * 5:(i + 1) * 5]
    ranks[1].set_epoch(2, start_batch=1)  # resume: the same items from batch 1 on
    assert list(ranks[1]) == b[5:]
    with pytest.raises(UsageError, match="35 of 40 rows are left out"):
        GlobalBatchSampler(40, 8, 0, 1, seed=0, shuffle=True, usable=np.arange(40) < 5)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_csv_whose_images_are_all_missing_is_one_line(tmp_path, capsys, workers):
    """A wrong --data-root: every image is missing, so substitution gives up after 64 rows; in a loader worker too."""
    from training.main import main

    csv = write_image_csv(str(tmp_path / "data"), n=80, bad={i: "missing" for i in range(80)})
    argv = ["--model", "tiny-student", "--train-data", csv, "--data-root", str(tmp_path / "data"),
            "--batch-size", "4", "--epochs", "1", "--workers", str(workers), "--logs", "", "--device", "cpu",
            "--precision", "fp32", "--distill", "task=1", "--zeroshot-frequency", "0", "--val-frequency", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not be used (missing_image" in err[0] and "--data-root" in err[0], err

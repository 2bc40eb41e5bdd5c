"""CSV loading: bad rows are skipped and counted, batches stay full, order is deterministic and world-size free."""

import argparse

import open_clip
import pytest
import torch

import training  # noqa: F401
from helpers import write_image_csv
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
    info = get_data(_args(csv, root, batch_size=5), _transforms())["train"]
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
    info = get_data(_args(csv, root), _transforms(teacher_size=40))["train"]
    batch = next(iter(info.dataloader))
    assert batch["image"].shape[-1] == 32 and batch["teacher_image"].shape[-1] == 40
    assert batch["text"].shape[-1] == 24 and batch["teacher_text"].shape[-1] == 32
    # Undo each normalisation and compare at a common size: same crop, so nearly the same pixels.
    s = batch["image"] * 0.5 + 0.5
    t = torch.nn.functional.interpolate(batch["teacher_image"] * 0.3 + 0.4, size=32, mode="bilinear",
                                        antialias=True)
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
        get_data(_args(str(tmp_path / "nope.csv"), None), _transforms())
    csv = write_image_csv(str(tmp_path), n=8)
    with pytest.raises(UsageError, match="no column 'caption'"):
        get_data(_args(csv, str(tmp_path), csv_caption_key="caption"), _transforms())


def test_csv_list_with_root_list(tmp_path):
    a = write_image_csv(str(tmp_path / "a"), n=8, seed=1)
    b = write_image_csv(str(tmp_path / "b"), n=8, seed=2)
    info = get_data(_args(f"{a},{b}", f"{tmp_path / 'a'},{tmp_path / 'b'}"), _transforms())["train"]
    assert info.num_batches == 4
    assert sum(len(batch["key"]) for batch in info.dataloader) == 16

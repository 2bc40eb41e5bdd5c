"""python -m training.data.convert: shards + sizes.json, stable keys, skip summary, overwrite refusal."""

import json
import os
import subprocess
import sys
import tarfile
from types import SimpleNamespace

import pytest
import torch

from helpers import write_image_csv
from training.config import DataConfig, section_from
from training.data.common import DataTransforms
from training.data.convert import main
from training.data.wds import get_wds_dataset

BAD = {3: "missing", 5: "corrupt", 7: "empty"}


def _wds(args, transforms, epoch=0, is_train=True):
    """get_wds_dataset from the flat test settings (the data section plus seed, rank and world size)."""
    return get_wds_dataset(section_from(DataConfig, vars(args)), transforms, seed=args.seed, epoch=epoch,
                           is_train=is_train, rank=vars(args).get("rank"),
                           world_size=vars(args).get("world_size"))



def _transforms():
    import torchvision.transforms.functional as TF

    def image(im):
        return TF.to_tensor(im.resize((8, 8)))

    return DataTransforms(student_train=image, student_val=image,
                          tokenizer=lambda texts: torch.zeros(len(texts), 3, dtype=torch.long))


def test_convert_writes_shards_sizes_and_stable_keys(tmp_path, capsys):
    csv = write_image_csv(str(tmp_path / "data"), n=23, bad=BAD)
    out = str(tmp_path / "shards")
    assert main([csv, "--data-root", str(tmp_path / "data"), "--out", out, "--samples-per-shard", "8",
                 "--workers", "0", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 20 of 23 rows into 3 shards" in printed
    for reason, key in [("empty_caption", "train/7"), ("missing_image", "train/3"), ("corrupt_image", "train/5")]:
        assert f"skipped 1 ({reason})" in printed and key in printed
    with open(os.path.join(out, "sizes.json")) as f:
        assert json.load(f) == {"00000.tar": 8, "00001.tar": 8, "00002.tar": 4}
    with tarfile.open(os.path.join(out, "00000.tar")) as tf:
        names = tf.getnames()
        meta = json.loads(tf.extractfile("train/0.json").read())
    assert names[:3] == ["train/0.jpg", "train/0.txt", "train/0.json"]
    assert meta["row"] == 0 and meta["caption"].startswith("a red square")
    # the loader reads them back under the CSV loader's keys (<csv stem>/<row>)
    args = SimpleNamespace(val_data=os.path.join(out, "{00000..00002}.tar"), val_num_samples=None, batch_size=5,
                           workers=0, seed=0, wds_caption_key="txt", wds_key_format="auto", wds_shuffle_buffer=10)
    info = _wds(args, _transforms(), 0, is_train=False)
    keys = [k for batch in info.dataloader for k in batch["key"]]
    assert info.num_samples == 20
    assert keys == [f"train/{i}" for i in range(23) if i not in BAD]


def test_convert_refuses_to_overwrite_and_bad_input_exits_2(tmp_path):
    csv = write_image_csv(str(tmp_path / "data"), n=4)
    out = str(tmp_path / "shards")
    cmd = [sys.executable, "-m", "training.data.convert", csv, "--data-root", str(tmp_path / "data"), "--out", out,
           "--samples-per-shard", "3", "--workers", "0", "--no-progress"]
    assert main(cmd[3:]) == 0
    before = os.path.getmtime(os.path.join(out, "00000.tar"))
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert os.path.getmtime(os.path.join(out, "00000.tar")) == before
    assert main([*cmd[3:], "--overwrite", "--samples-per-shard", "4"]) == 0
    assert sorted(f for f in os.listdir(out) if f.endswith(".tar")) == ["00000.tar"]
    with pytest.raises(SystemExit) as exc:
        main([csv, "--out", str(tmp_path / "o2"), "--csv-img-key", "nope", "--workers", "0"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main([csv, "--out", str(tmp_path / "o3"), "--workers", "0", "--no-progress"])  # no --data-root
    assert exc.value.code == 2 and not os.path.exists(os.path.join(tmp_path, "o3", "00000.tar"))

"""Tokenise once: `convert --tokenize MODEL` stores caption ids; the WebDataset loader reads them instead of
tokenising, only for the tokenizer they were made with."""

import json
import os
import subprocess
import sys
import tarfile

import open_clip
import pytest
import torch

import training  # noqa: F401  (registers the tiny model configs)
from helpers import write_image_csv
from training.config import DataConfig, section_from
from training.data.common import DataTransforms
from training.data.convert import main
from training.data.tokens import FINGERPRINT, TOKENS_EXT, decode_tokens
from training.data.transforms import ImageFormat, PairedViews
from training.data.wds import get_wds_dataset
from training.errors import UsageError


class CountingTokenizer:
    """The real tokenizer, counting the captions it is asked to tokenise."""

    def __init__(self, name):
        self.inner, self.calls = open_clip.get_tokenizer(name), 0

    def __call__(self, texts):
        self.calls += len(texts)
        return self.inner(texts)


def _loader(pattern, tokenizer, **extra):
    fmt = ImageFormat(16, (0.5,) * 3, (0.5,) * 3)
    tf = DataTransforms(tokenizer=tokenizer, train_views=PairedViews(fmt, None, train=True),
                        val_views=PairedViews(fmt, None, train=False))
    args = {**dict(train_data=pattern, train_num_samples=12, batch_size=4, workers=0, wds_caption_key="txt",
                   wds_key_format="auto", wds_shuffle_buffer=8), **extra}
    return get_wds_dataset(section_from(DataConfig, args), tf, seed=0, rank=0, world_size=1)


@pytest.fixture(scope="module")
def shards(module_tmp_path):
    root = module_tmp_path
    csv = write_image_csv(str(root / "data"), n=12)
    out = str(root / "shards")
    assert main([csv, "--data-root", str(root / "data"), "--out", out, "--samples-per-shard", "12", "--workers", "0",
                 "--no-progress", "--tokenize", "tiny-student"]) == 0
    return {"csv": csv, "root": root, "out": out, "pattern": os.path.join(out, "00000.tar")}


def test_convert_stores_the_ids_of_each_caption(shards):
    tok = open_clip.get_tokenizer("tiny-student")
    with tarfile.open(shards["pattern"]) as tf:
        caption = tf.extractfile("train/3.txt").read().decode()
        ids = decode_tokens(tf.extractfile(f"train/3.{TOKENS_EXT}").read())
    assert torch.equal(ids, tok([caption])) and ids.dtype == torch.long
    with open(os.path.join(shards["out"], FINGERPRINT)) as f:
        assert json.load(f)["model"] == "tiny-student"


def test_the_loader_reads_stored_ids_instead_of_tokenising(shards):
    counting = CountingTokenizer("tiny-student")
    info = _loader(shards["pattern"], counting)
    probes = counting.calls  # the fingerprint check tokenises the probe captions once
    batches = list(info.dataloader)
    assert counting.calls == probes  # no caption was tokenised while loading
    with tarfile.open(shards["pattern"]) as tf:
        captions = {m.name[:-4]: tf.extractfile(m).read().decode() for m in tf.getmembers() if m.name.endswith(".txt")}
    for batch in batches:
        assert torch.equal(batch["text"], counting.inner([captions[k] for k in batch["key"]]))
    # the same shards without the fingerprint: the loader tokenises, with the same result
    plain = CountingTokenizer("tiny-student")
    fp = os.path.join(shards["out"], FINGERPRINT)
    os.rename(fp, fp + ".off")
    try:
        again = list(_loader(shards["pattern"], plain).dataloader)
    finally:
        os.rename(fp + ".off", fp)
    assert plain.calls == 12
    assert all(torch.equal(a["text"], b["text"]) and a["key"] == b["key"] for a, b in zip(batches, again))


def test_ids_of_another_tokenizer_are_refused(shards):
    with pytest.raises(UsageError, match="tokenises differently") as err:
        _loader(shards["pattern"], open_clip.get_tokenizer("tiny-teacher"))  # context 32, not 24
    assert "\n" not in str(err.value)
    # another caption key: the stored ids (of .txt) are not used
    counting = CountingTokenizer("tiny-student")
    list(_loader(shards["pattern"], counting, wds_caption_key="txt,json").dataloader)
    assert counting.calls > 12


def test_unknown_tokenize_model_exits_2(shards, tmp_path):
    cmd = [sys.executable, "-m", "training.data.convert", shards["csv"], "--data-root", str(shards["root"] / "data"),
           "--out", str(tmp_path / "out"), "--workers", "0", "--no-progress", "--tokenize", "no-such-model"]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1 and "unknown model" in run.stderr

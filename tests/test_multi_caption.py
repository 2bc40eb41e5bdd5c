"""Several captions per image: JSON list cells in CSV, several keys / JSON lists in WebDataset shards, the
reproducible per-(seed, epoch, key) draw, MobileCLIP's two-caption loss (--captions-per-step 2), the teacher cache
storing every caption's embedding and replaying the drawn one, and exact resume, online and cached, through the CLI."""

import io
import json
import os
import random
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import write_image_csv
from training import cache_teacher
from training.data.common import DataTransforms, caption_rng, draw_captions, parse_caption_list
from training.data.csv import CsvDataset
from training.data.transforms import ImageFormat, PairedViews
from training.data.wds import decode_caption
from training.main import main
from training.models import create_clip
from training.teacher_cache import TeacherCache
from training.train import distill_losses

K = 3  # captions per row (row 0 keeps a single caption)


def captions_of(i: int) -> list[str]:
    return [f"caption {c} of square {i}" for c in range(1 if i == 0 else K)]


def write_multi_caption_csv(folder: str, n: int) -> str:
    path = write_image_csv(folder, n=n, size=64)
    with open(path) as f:
        rows = f.read().splitlines()
    out = [rows[0]] + [f"{r.split(chr(9))[0]}\t{json.dumps(captions_of(i))}" for i, r in enumerate(rows[1:])]
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
    return path


@pytest.fixture(scope="module")
def world(module_tmp_path):
    root = module_tmp_path
    csv = write_multi_caption_csv(str(root / "data"), 16)
    teacher = str(root / "teacher.pt")
    torch.manual_seed(7)
    torch.save(create_clip("tiny-teacher", None, torch.device("cpu")).state_dict(), teacher)
    return {"root": root, "csv": csv, "data_root": str(root / "data"), "teacher": teacher}


def _tokenizer(model: str = "tiny-student"):
    import open_clip

    return open_clip.get_tokenizer(model)


def test_caption_cells_and_draws():
    assert parse_caption_list('["a cat", " ", "a small cat"]') == ["a cat", "a small cat"]
    assert parse_caption_list('["only one"]') == "only one"
    assert parse_caption_list("[sic] a cat") == "[sic] a cat"  # not JSON: one caption, as written
    assert parse_caption_list('[1, 2]') == "[1, 2]"  # not a list of strings
    draws = [draw_captions(4, 1, caption_rng(0, e, "k"))[0] for e in range(40)]
    assert draws == [draw_captions(4, 1, caption_rng(0, e, "k"))[0] for e in range(40)]  # a function of (seed, epoch, key)
    assert set(draws) == {0, 1, 2, 3}
    for e in range(40):
        a, b = draw_captions(4, 2, caption_rng(0, e, "k"))
        assert a != b
    assert draw_captions(1, 2, random.Random(0)) == [0, 0]  # one caption: used for both
    assert draw_captions(4, 2, None) == [0, 1]  # evaluation: the first ones


def test_wds_caption_keys_and_json_lists():
    sample = {"txt": b"the gt caption", "syn.txt": b"a synthetic one", "captions.json": b'["x", "y"]',
              "json": json.dumps({"syn": ["s1", "s2"], "title": "t"}).encode()}
    assert decode_caption(sample, "txt") == "the gt caption"
    assert decode_caption(sample, "txt,syn.txt") == ["the gt caption", "a synthetic one"]
    assert decode_caption(sample, "captions.json") == ["x", "y"]
    assert decode_caption(sample, "title,syn") == ["t", "s1", "s2"]
    assert decode_caption({"txt": b"  "}, "txt") is None


def test_csv_loader_draws_reproducibly_and_gives_two_captions(world):
    tok = _tokenizer()
    fmt = ImageFormat(64, (0.5,) * 3, (0.5,) * 3)
    tf = DataTransforms(tokenizer=tok, train_views=PairedViews(fmt, None, train=True, seed=0),
                        val_views=PairedViews(fmt, None, train=False))
    ds = CsvDataset([world["csv"]], [world["data_root"]], tf, True, seed=0)
    assert ds.captions[0] == "caption 0 of square 0" and ds.captions[1] == captions_of(1)
    s = ds[(1, 0)]
    chosen = int(s["caption_index"][0])
    assert torch.equal(s["text"], tok([captions_of(1)[chosen]])[0])
    assert torch.equal(ds[(1, 0)]["text"], s["text"]) and torch.equal(ds[(1, 0)]["image"], s["image"])
    assert len({int(ds[(1, e)]["caption_index"][0]) for e in range(12)}) > 1  # each epoch draws anew
    two = CsvDataset([world["csv"]], [world["data_root"]], DataTransforms(
        tokenizer=tok, train_views=tf.train_views, val_views=tf.val_views, captions_per_step=2), True, seed=0)
    t = two[(1, 0)]
    a, b = t["caption_index"].tolist()
    assert a != b and torch.equal(t["text_2"], tok([captions_of(1)[b]])[0])
    assert torch.equal(t["image"], s["image"])  # the caption draw leaves the view unchanged


def test_two_caption_loss_is_the_mean_of_both():
    from training.distill import build_distill_loss
    from training.student_kinds import student_kind

    gen = torch.Generator().manual_seed(0)
    b = 4
    loss_fn = build_distill_loss("task=1,crd=1,fd=5", 6, 8).double()
    student = {"image_features": torch.randn(b, 6, generator=gen, dtype=torch.float64),
               "text_features": torch.randn(2 * b, 6, generator=gen, dtype=torch.float64),
               "logit_scale": torch.tensor(10.0, dtype=torch.float64), "image_intermediates": [],
               "text_intermediates": []}
    t_v = F.normalize(torch.randn(b, 8, generator=gen, dtype=torch.float64), dim=-1)
    t_t = F.normalize(torch.randn(2 * b, 8, generator=gen, dtype=torch.float64), dim=-1)
    teacher = {"image_features": [t_v], "text_features": [t_t], "logit_scales": [torch.tensor(30.0)],
               "logit_biases": [None]}
    trainer = SimpleNamespace(loss_fn=loss_fn, step=0, kind=student_kind("clip"), env=SimpleNamespace(device="cpu"),
                              config=SimpleNamespace(data=SimpleNamespace(captions_per_step=2)))
    out = distill_losses(trainer, student, teacher)
    for half in (0, 1):
        rows = slice(half * b, (half + 1) * b)
        ref = loss_fn(student["image_features"], student["text_features"][rows], student["logit_scale"], t_v,
                      t_t[rows], torch.tensor(30.0))
        if half == 0:
            refs = {k: v / 2 for k, v in ref.items()}
        else:
            refs = {k: refs[k] + v / 2 for k, v in ref.items()}
    assert out.keys() == refs.keys()
    for k in refs:
        torch.testing.assert_close(out[k], refs[k], rtol=1e-12, atol=0)


@pytest.fixture(scope="module")
def cache_dir(world):
    out = str(world["root"] / "cache")
    assert cache_teacher.main(["--teacher", "tiny-teacher", "--teacher-pretrained", world["teacher"],
                               "--train-data", world["csv"], "--data-root", world["data_root"], "--views", "2",
                               "--out", out, "--samples-per-shard", "6", "--batch-size", "4", "--workers", "0",
                               "--device", "cpu", "--cache-dtype", "fp32"]) == 0
    return out


def test_teacher_cache_stores_every_caption_and_replays_the_drawn_one(world, cache_dir):
    out = cache_dir
    assert cache_teacher.main(["--verify", out]) == 0
    with open(os.path.join(out, "manifest.json")) as f:
        counts = json.load(f)["counts"]
    assert counts["captions"] == 1 + 15 * K and counts["max_captions_per_sample"] == K
    cache = TeacherCache(out)
    teacher = create_clip("tiny-teacher", world["teacher"], torch.device("cpu")).eval()
    tok = _tokenizer()
    with torch.no_grad():
        ref = F.normalize(teacher.encode_text(_tokenizer("tiny-teacher")(captions_of(5))), dim=-1)
    e = cache.entry("train/5")
    assert e["caption_count"] == K and e["captions"][0].shape == (K, 128)
    torch.testing.assert_close(e["captions"][0], ref, rtol=0, atol=1e-5)
    assert cache.entry("train/0")["caption_count"] == 1
    fmt = ImageFormat(64, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    tf = DataTransforms(tokenizer=tok, train_views=PairedViews(fmt, None, train=True, seed=0),
                        val_views=PairedViews(fmt, None, train=False), teacher_cache=cache, captions_per_step=2)
    ds = CsvDataset([world["csv"]], [world["data_root"]], tf, True, seed=0)
    s = ds[(5, 3)]
    a, b = s["caption_index"].tolist()
    torch.testing.assert_close(s["teacher_text_emb"], ref[a], rtol=0, atol=1e-5)
    torch.testing.assert_close(s["teacher_text_emb_2"], ref[b], rtol=0, atol=1e-5)


def _argv(world, name, *extra):
    return ["--model", "tiny-student", "--train-data", world["csv"], "--data-root", world["data_root"],
            "--batch-size", "4", "--epochs", "2", "--lr", "1e-3", "--warmup", "1", "--precision", "fp32",
            "--workers", "0", "--logs", str(world["root"] / "logs"), "--name", name, "--zeroshot-frequency", "0",
            "--val-frequency", "0", "--device", "cpu", "--captions-per-step", "2", "--distill", "task=1,crd=1,fd=10",
            *extra]


def _ckpt(world, name, filename):
    return torch.load(world["root"] / "logs" / name / "checkpoints" / filename, weights_only=True)


@pytest.mark.parametrize("source", ["online", "cached"])
def test_multi_caption_training_resumes_exactly(world, cache_dir, source):
    teacher = (["--teacher-cache", cache_dir] if source == "cached" else
               ["--teacher", "tiny-teacher", "--teacher-pretrained", world["teacher"]])
    # 4 batches per epoch x 2 epochs = 8 steps straight, vs 5 steps, stop, resume latest, 3 more
    assert main(_argv(world, f"{source}-straight", *teacher)) == 0
    assert main(_argv(world, f"{source}-resumed", *teacher, "--max-steps", "5")) == 0
    assert main(_argv(world, f"{source}-resumed", *teacher, "--resume", "latest")) == 0
    a, b = _ckpt(world, f"{source}-straight", "epoch_2.pt"), _ckpt(world, f"{source}-resumed", "epoch_2.pt")
    assert a["step"] == b["step"] == 8
    for part in ("model", "loss"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_two_captions_with_accumulation_is_refused_in_one_line(world, capsys):
    assert main(_argv(world, "refused", "--accum-freq", "2")) == 2
    assert "--captions-per-step 2" in capsys.readouterr().err


def test_wds_shards_with_several_captions_train(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(8):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("txt", f"gt caption {i}".encode()),
                              ("syn.json", json.dumps([f"syn {i} a", f"syn {i} b"]).encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    argv = ["--model", "tiny-student", "--train-data", str(shard), "--train-num-samples", "8",
            "--wds-caption-key", "txt,syn.json", "--captions-per-step", "2", "--batch-size", "4", "--epochs", "1",
            "--precision", "fp32", "--workers", "0", "--logs", str(tmp_path / "logs"), "--name", "wds",
            "--zeroshot-frequency", "0", "--val-frequency", "0", "--device", "cpu"]
    assert main(argv) == 0


def test_int8_cache_with_several_captions_verifies_and_replays(world, cache_dir, tmp_path):
    out = str(tmp_path / "int8")
    assert cache_teacher.main(["--teacher", "tiny-teacher", "--teacher-pretrained", world["teacher"],
                               "--train-data", world["csv"], "--data-root", world["data_root"], "--views", "1",
                               "--out", out, "--samples-per-shard", "16", "--batch-size", "5", "--workers", "0",
                               "--device", "cpu", "--cache-dtype", "int8"]) == 0
    assert cache_teacher.main(["--verify", out]) == 0
    q, ref = TeacherCache(out).entry("train/7"), TeacherCache(cache_dir).entry("train/7")
    assert q["captions"][0].shape == ref["captions"][0].shape == (K, 128)
    assert float((q["captions"][0] * ref["captions"][0]).sum(-1).min()) > 0.999  # int8 rounding only
    single = TeacherCache(out).entry("train/0")  # one caption in a shard of three-caption rows: padded, count 1
    assert single["caption_count"] == 1 and single["captions"][0].shape == (K, 128)
    assert torch.equal(single["captions"][0][1], single["captions"][0][0])

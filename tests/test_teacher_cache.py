"""Teacher-embedding cache: build/resume/verify, storage formats, exact view replay, and equivalence with the online
teacher (same losses and student gradients), exact resume and clear errors when training from the cache."""

import contextlib
import io
import json
import os
import random
import shutil
import tarfile

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import training  # noqa: F401  (registers the tiny model configs)
from training import cache_teacher, distributed, teacher_cache
from training.data.common import sample_rng
from training.data.device import normalize_pixels
from training.data.transforms import ImageFormat, ViewParams, render_pixels, render_view
from training.main import main
from training.models import create_clip
from training.params import parse_config
from training.teacher_cache import TeacherCache, TeacherCacheError, decode, encode, read_shard, verify_cache
from training.teacher_cache import build as cache_build
from training.train import teacher_outputs, train_step
from training.trainer import Trainer

COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 20)]
SIZES = [(48, 40), (40, 56), (64, 64), (70, 50)]  # non-square: crop boxes and centre views differ per image
N = 12


def write_images(folder, n=N, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rows = ["filepath\ttitle"]
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        pixels = np.clip(np.array(COLOURS[i % 4]) + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, "images", f"{i:04d}.jpg"), quality=90)
        rows.append(f"images/{i:04d}.jpg\t{caption_of(f'train/{i}')}")
    path = os.path.join(folder, "train.csv")
    with open(path, "w") as f:
        f.write("\n".join(rows) + "\n")
    return path


def caption_of(key):
    i = int(key.rsplit("/", 1)[1])
    return f"a photo of thing {i} in colour {i % 4}"


def load_image(world, key):
    row = int(key.rsplit("/", 1)[1])
    with Image.open(os.path.join(world["data_root"], "images", f"{row:04d}.jpg")) as im:
        return im.convert("RGB")


def build_argv(world, out, *extra, views=3, dtype="fp16"):
    return ["--teacher", "tiny-teacher", "--teacher-pretrained", world["teacher"], "--train-data", world["csv"],
            "--data-root", world["data_root"], "--views", str(views), "--cache-dtype", dtype, "--out", str(out),
            "--samples-per-shard", "5", "--batch-size", "4", "--workers", "0", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def world(module_tmp_path):
    root = module_tmp_path
    csv = write_images(str(root / "data"))
    teacher = str(root / "teacher.pt")
    torch.manual_seed(7)
    torch.save(create_clip("tiny-teacher", None, torch.device("cpu")).state_dict(), teacher)
    w = {"root": root, "csv": csv, "data_root": str(root / "data"), "teacher": teacher}
    for dtype in ("fp32", "fp16"):
        w[dtype] = str(root / f"cache-{dtype}")
        assert cache_teacher.main(build_argv(w, w[dtype], dtype=dtype)) == 0
    return w


def shard_files(cache_dir):
    return sorted(f for f in os.listdir(os.path.join(cache_dir, "shards")) if f.endswith(".safetensors"))


def flip_low_bit(path, tensor="image/0"):
    """Silent corruption: the lowest bit of the first element of one tensor (the value stays plausible)."""
    data = bytearray(open(path, "rb").read())
    header_len = int.from_bytes(data[:8], "little")
    start = json.loads(data[8:8 + header_len])[tensor]["data_offsets"][0]
    data[8 + header_len + start] ^= 0x01
    open(path, "wb").write(bytes(data))


# ---- building, resuming, verifying -----------------------------------------------------------------------------------
def test_manifest_records_what_was_built(world):
    m = json.load(open(os.path.join(world["fp16"], "manifest.json")))
    assert m["format"] == teacher_cache.FORMAT and m["complete"]
    t = m["teachers"][0]
    assert (t["name"], t["embed_dim"], t["context_length"]) == ("tiny-teacher", 128, 32)
    assert len(t["weights_sha256"]) == 64 and t["file_sha256"] == teacher_cache.file_sha256(world["teacher"])
    assert abs(t["logit_scale"] - 1 / 0.07) < 1e-4
    assert m["preprocessing"]["size"] == 64 and m["preprocessing"]["interpolation"] == "bicubic"
    assert m["augmentation"]["views"] == 3 and m["augmentation"]["scale"] == [0.9, 1.0]
    assert m["storage"] == {**m["storage"], "dtype": "fp16", "normalised": True}
    assert m["counts"]["samples"] == N and m["counts"]["shards"] == 3  # 12 rows, 5 per shard
    assert m["data"]["csv"][0]["sha256"] == teacher_cache.file_sha256(world["csv"])
    for rec in m["shards"]:
        path = os.path.join(world["fp16"], "shards", rec["file"])
        assert teacher_cache.file_sha256(path) == rec["sha256"] and os.path.getsize(path) == rec["bytes"]
    tensors, meta = read_shard(os.path.join(world["fp16"], "shards", m["shards"][0]["file"]))
    assert meta["keys"] == [f"train/{i}" for i in range(5)] and meta["format"] == teacher_cache.FORMAT
    assert tensors["image/0"].shape == (5, 3, 128) and tensors["image/0"].dtype == torch.float16
    assert tensors["views"].shape == (5, 3, 5) and tensors["text/0"].shape == (5, 128)


def test_verify_cli_ok_and_detects_corruption(world, tmp_path, capsys):
    assert cache_teacher.main(["--verify", world["fp16"]]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("OK ") and "\n" not in line and f"{N} samples" in line
    bad = tmp_path / "bad"
    shutil.copytree(world["fp16"], bad)
    flip_low_bit(os.path.join(bad, "shards", shard_files(bad)[1]))
    assert cache_teacher.main(["--verify", str(bad)]) == 1
    line = capsys.readouterr().out.strip()
    assert line.startswith("FAILED ") and "sha256" in line and "\n" not in line
    assert cache_teacher.main(["--verify", str(bad), "--quick"]) == 0  # sizes agree; only the checksum sees it
    os.remove(os.path.join(bad, "shards", shard_files(bad)[0]))
    ok, summary = verify_cache(str(bad))
    assert not ok and "missing" in summary
    os.remove(os.path.join(bad, "manifest.json"))
    ok, summary = verify_cache(str(bad))
    assert not ok and "did not finish" in summary


def test_killed_build_resumes_without_redoing_or_corrupting(world, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    real = cache_build._write_task
    calls = []

    def dying(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while the third shard is being written
        calls.append(args[1].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_build, "_write_task", dying)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher.main(build_argv(world, out))
    assert not os.path.exists(out / "manifest.json")
    assert verify_cache(str(out))[0] is False
    # leftovers of a kill: a temp file, and a shard renamed into place whose record was never written
    open(out / "shards" / ".tmp-x-csv-000002.safetensors", "wb").write(b"partial")
    shutil.copy(os.path.join(world["fp16"], "shards", "csv-000002.safetensors"), out / "shards")
    done = {f: os.stat(out / "shards" / f).st_mtime_ns for f in ("csv-000000.safetensors", "csv-000001.safetensors")}
    monkeypatch.setattr(cache_build, "_write_task", real)
    redone = []
    monkeypatch.setattr(cache_build, "_write_task", lambda *a, **k: (redone.append(a[1].name), real(*a, **k)))
    assert cache_teacher.main(build_argv(world, out)) == 0
    assert redone == ["csv-000002"]  # finished shards are skipped
    assert {f: os.stat(out / "shards" / f).st_mtime_ns for f in done} == done
    assert not [f for f in os.listdir(out / "shards") if f.startswith(".tmp-")]
    ours = json.load(open(out / "manifest.json"))["shards"]
    ref = json.load(open(os.path.join(world["fp16"], "manifest.json")))["shards"]
    assert [r["sha256"] for r in ours] == [r["sha256"] for r in ref]  # identical to the uninterrupted build
    assert verify_cache(str(out))[0]
    # a re-run of a complete cache does nothing; other settings are refused
    redone.clear()
    assert cache_teacher.main(build_argv(world, out)) == 0 and redone == []
    assert cache_teacher.main(build_argv(world, out, views=2)) == 2


def test_ensemble_members_side_by_side(world, tmp_path):
    other = str(tmp_path / "teacher2.pt")
    torch.manual_seed(8)
    torch.save(create_clip("tiny-teacher", None, torch.device("cpu")).state_dict(), other)
    out = tmp_path / "ens"
    argv = build_argv(world, out, views=2)
    argv[1], argv[3] = "tiny-teacher,tiny-teacher", f"{world['teacher']},{other}"
    assert cache_teacher.main(argv) == 0
    m = json.load(open(out / "manifest.json"))
    assert [t["file_sha256"] for t in m["teachers"]] == [teacher_cache.file_sha256(p) for p in (world["teacher"], other)]
    cache = TeacherCache(str(out))
    single = TeacherCache(world["fp32"])
    e, s = cache.entry("train/3"), single.entry("train/3")
    assert len(e["image"]) == 2 and e["image"][0].shape == (2, 128)
    assert torch.allclose(e["image"][0], s["image"][0][:2], atol=2e-3)  # member 0 = the single teacher
    assert not torch.allclose(e["image"][1], e["image"][0], atol=1e-2)


# ---- storage formats -------------------------------------------------------------------------------------------------
def test_storage_format_accuracy_cosine_to_fp32(world, tmp_path):
    """Accuracy cost of each storage dtype: cosine of the stored vector to the fp32 one (printed with -s)."""
    cache = TeacherCache(world["fp32"])
    real = torch.cat([torch.cat([cache.entry(f"train/{i}")["image"][0], cache.entry(f"train/{i}")["text"][0][None]])
                      for i in range(N)])
    gen = torch.Generator().manual_seed(0)
    wide = torch.nn.functional.normalize(torch.randn(2000, 768, generator=gen), dim=-1)  # ViT-L/14's width
    floor = {"fp32": 1 - 1e-9, "fp16": 1 - 1e-6, "bf16": 1 - 1e-5, "int8": 1 - 2e-4}  # measured: 0, 3e-8, 2e-6, 6e-5
    for name, x in (("tiny-teacher D=128", real), ("gaussian D=768", wide)):
        for dtype, minimum in floor.items():
            stored, scale = encode(x, dtype)
            cos = torch.nn.functional.cosine_similarity(decode(stored, scale).double(), x.double(), dim=-1)
            print(f"{name} {dtype}: 1 - cosine mean {1 - cos.mean():.2e}, max {1 - cos.min():.2e}")
            assert cos.min() >= minimum, (name, dtype, cos.min())
    stored, scale = encode(wide, "int8")
    assert stored.dtype == torch.int8 and scale.shape == (2000,)
    assert stored.abs().amax(-1).eq(127).all()  # the per-vector scale uses the full int8 range


def test_int8_and_bf16_caches_verify_and_read(world, tmp_path):
    for dtype in ("int8", "bf16"):
        out = tmp_path / dtype
        argv = build_argv(world, out, views=1, dtype=dtype)
        argv[argv.index("--samples-per-shard") + 1] = "100"
        assert cache_teacher.main(argv) == 0
        assert verify_cache(str(out))[0]
        e, ref = TeacherCache(str(out)).entry("train/5"), TeacherCache(world["fp32"]).entry("train/5")
        assert float((e["text"][0] * ref["text"][0]).sum()) > 0.999
        assert float((e["image"][0][0] * ref["image"][0][0]).sum()) > 0.999


# ---- replay ----------------------------------------------------------------------------------------------------------
def _transforms(student_fmt, cache):
    from training.data.common import DataTransforms
    from training.data.transforms import PairedViews
    from training.models import _bundle

    tok = _bundle(create_clip("tiny-student", None, torch.device("cpu"))).tokenizer
    return DataTransforms(tokenizer=tok, train_views=PairedViews(student_fmt, None, train=True, seed=0),
                          val_views=PairedViews(student_fmt, None, train=False), teacher_cache=cache)


def test_replayed_view_reproduces_the_teacher_pixels_exactly(world):
    from training.data.common import make_sample
    from training.models import _bundle

    teacher = _bundle(create_clip("tiny-teacher", None, torch.device("cpu")))
    tfmt = teacher.image_format
    cache = TeacherCache(world["fp32"], views="all")
    same = _transforms(tfmt, cache)
    small = ImageFormat(40, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear")  # any student format replays the box
    other = _transforms(small, cache)
    seen = set()
    for i in range(N):
        key = f"train/{i}"
        image = load_image(world, key)
        caption = f"a photo of thing {i} in colour {i % 4}"
        built = cache_build.prepare_sample(image, caption, key, tfmt, teacher.tokenizer, 3, seed=0)
        for epoch in range(4):
            s = make_sample(image, caption, key, same, True, sample_rng(0, epoch, key))
            k = int(s["teacher_view_index"])
            seen.add(k)
            # uint8 from the loader, normalised on the device: exactly what the teacher embedded
            assert torch.equal(normalize_pixels(s["image"], tfmt), built["pixels"][k])
            assert torch.equal(s["view"], built["views"][k].long())
            entry = cache.entry(key)
            assert torch.equal(s["teacher_image_emb"], entry["image"][0][k])
            assert torch.equal(s["teacher_text_emb"], entry["text"][0])
            o = make_sample(image, caption, key, other, True, sample_rng(0, epoch, key))
            assert int(o["teacher_view_index"]) == k  # the view index is a function of (seed, epoch, key)
            assert torch.equal(o["image"], render_pixels(image, ViewParams.from_tuple(built["views"][k].tolist()), small))
        assert built["views"][0].tolist()[2] == min(image.size)  # view 0 is the centre (eval) square
    assert seen == {0, 1, 2}
    # default selection: the augmented views 1..K-1
    auto = _transforms(tfmt, TeacherCache(world["fp32"]))
    ks = {int(make_sample(load_image(world, "train/0"), "a photo of thing 0 in colour 0", "train/0", auto, True,
                          sample_rng(0, e, "train/0"))["teacher_view_index"]) for e in range(12)}
    assert ks == {1, 2}


def test_sample_checks_missing_key_resized_image_changed_caption(world):
    from training.data.common import make_sample

    cache = TeacherCache(world["fp32"])
    tf = _transforms(ImageFormat(64, (0.5,) * 3, (0.5,) * 3), cache)
    image = load_image(world, "train/1")
    caption = "a photo of thing 1 in colour 1"
    with pytest.raises(TeacherCacheError, match="not in the teacher cache"):
        make_sample(image, caption, "train/999", tf, True, random.Random(0))
    with pytest.raises(TeacherCacheError, match="resized"):
        make_sample(image.resize((20, 20)), caption, "train/1", tf, True, random.Random(0))
    with pytest.raises(TeacherCacheError, match="caption differs"):
        make_sample(image, caption + "!", "train/1", tf, True, random.Random(0))
    cache.missing = "skip"
    with pytest.raises(teacher_cache.SampleNotCached) as info:
        make_sample(image, caption, "train/999", tf, True, random.Random(0))
    assert info.value.skip_reason == "not_in_teacher_cache"
    val = make_sample(image, caption, "train/999", tf, False)  # evaluation samples never consult the cache
    assert "teacher_image_emb" not in val


def test_worker_reraise_stays_one_line():
    wrapped = ("Caught TeacherCacheError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               "  File \"x.py\", line 1, in f\n    raise X\ntraining.teacher_cache.TeacherCacheError: sample 'a' is not "
               "in the teacher cache d: rebuild\n")
    assert str(TeacherCacheError(wrapped)) == "sample 'a' is not in the teacher cache d: rebuild"


# ---- training from the cache -----------------------------------------------------------------------------------------
def train_argv(world, name, *extra, batch_size=4, logs=True):
    return ["--model", "tiny-student", "--train-data", world["csv"], "--data-root", world["data_root"],
            "--batch-size", str(batch_size), "--epochs", "2", "--lr", "1e-3", "--warmup", "2", "--precision", "fp32",
            "--workers", "0", "--logs-dir", str(world["root"] / "logs") if logs else "", "--name", name,
            "--log-every-n-steps", "1", "--zeroshot-frequency", "0", "--val-frequency", "0", "--device", "cpu",
            "--recipe", "clip-kd", *extra]


def _build(argv):
    return Trainer(parse_config(argv), distributed.init_distributed("cpu"))


def _step(trainer, batch):
    """train_step with the optimizer update disabled: returns the loss terms and the student gradients."""
    trainer.optimizer.step = lambda *a, **k: None
    losses = train_step(trainer, batch)
    grads = {n: p.grad.clone() for n, p in trainer.student.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in losses.items()}, grads


@pytest.mark.parametrize("dtype,tol,grad_tol", [("fp32", 1e-6, 1e-5), ("fp16", 1e-3, 2e-3)])
def test_online_and_cached_teacher_give_the_same_losses_and_gradients(world, dtype, tol, grad_tol):
    extra = ["--force-image-size", "48", "--distill", "task=1,crd=1,icl=1,fd=2000,xkd=1,gd=1,afd=1,sim=1,sim_inter=1,sim_intra=1,emb=1,emb_text=1"]
    cached = _build(train_argv(world, "eq", "--teacher-cache", world[dtype], "--cache-views", "all", *extra,
                               batch_size=6, logs=False))
    online = _build(train_argv(world, "eq", "--teacher", "tiny-teacher", "--teacher-pretrained", world["teacher"],
                               *extra, batch_size=6, logs=False))
    assert cached.teacher.embed_dims == online.teacher.embed_dims == [128]
    tfmt = ImageFormat.from_model(online.teacher.members[0])
    ttok = open_clip.get_tokenizer("tiny-teacher")  # context 32; the student's is 24
    for batch in cached.data.dataloader:
        # the online teacher sees the very views the cache replayed to the student, rendered in its own format
        online_batch = {k: v for k, v in batch.items() if not k.startswith("teacher_")}
        online_batch["teacher_image"] = torch.stack([
            render_view(load_image(world, key), ViewParams.from_tuple(view.tolist()), tfmt)
            for key, view in zip(batch["key"], batch["view"])])
        online_batch["teacher_text"] = ttok([caption_of(key) for key in batch["key"]])
        t_cached = teacher_outputs(cached, batch, batch["image"], batch["text"])
        t_online = teacher_outputs(online, online_batch, batch["image"], batch["text"])
        for name in ("image_features", "text_features", "logit_scales"):
            for a, b in zip(t_cached[name], t_online[name]):
                assert torch.allclose(a, b, atol=tol, rtol=0), (name, (a - b).abs().max())
        lc, gc = _step(cached, batch)
        lo, go = _step(online, online_batch)
        assert lc.keys() == lo.keys() and len(lc) > 8
        for k in lc:
            assert abs(lc[k] - lo[k]) <= tol * max(1.0, abs(lo[k])), (k, lc[k], lo[k])
        assert gc.keys() == go.keys()
        rels = {n: float((gc[n] - go[n]).norm() / go[n].norm().clamp_min(1e-12)) for n in gc}
        worst = max(rels, key=rels.get)
        assert rels[worst] <= grad_tol, (worst, rels[worst])
        print(f"{dtype}: max |term diff| / max(1, |term|) "
              f"{max(abs(lc[k] - lo[k]) / max(1.0, abs(lo[k])) for k in lc):.1e}, "
              f"max relative gradient diff {rels[worst]:.1e} ({worst}), "
              f"median {float(np.median(list(rels.values()))):.1e}")


def test_resume_mid_epoch_is_exact_from_the_cache(world):
    # mirrors tests/test_train_e2e.py::test_resume_mid_epoch_is_exact: 3 batches x 2 epochs straight, vs 4 + resume
    cache = ["--teacher-cache", world["fp16"]]
    assert main(train_argv(world, "c-straight", *cache)) == 0
    assert main(train_argv(world, "c-resumed", *cache, "--max-steps", "4")) == 0
    ckpt = world["root"] / "logs" / "c-resumed" / "checkpoints"
    assert torch.load(ckpt / "step_4.pt", weights_only=True)["batch_in_epoch"] == 1
    assert main(train_argv(world, "c-resumed", *cache, "--resume", "latest")) == 0
    a = torch.load(world["root"] / "logs" / "c-straight" / "checkpoints" / "epoch_2.pt", weights_only=True)
    b = torch.load(ckpt / "epoch_2.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for part in ("model", "loss"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def run_main(argv) -> tuple[int, str]:
    """training.main's exit code and the last line it wrote to stderr (no capsys: the trainer's logging keeps a
    handle on sys.stdout, which must outlive the test)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    lines = err.getvalue().strip().splitlines()
    return code, lines[-1] if lines else ""


def test_mismatches_fail_with_one_line_errors(world, tmp_path):
    cache = ["--teacher-cache", world["fp16"]]
    cases = [
        (["--teacher", "tiny-student"], "differs from the teacher in the cache"),
        (["--teacher", "tiny-teacher", "--teacher-pretrained", str(tmp_path / "other.pt")], "is not the checkpoint"),
        (["--distill", "task=1,feat=1"], "feat term needs the teacher's intermediate tokens"),
        (["--cache-views", "augmented", "--teacher-cache", world["fp16"] + "-none"], "does not exist"),
    ]
    torch.save(create_clip("tiny-teacher", None, torch.device("cpu")).state_dict(), tmp_path / "other.pt")
    for extra, message in cases:
        code, line = run_main(train_argv(world, "err", *cache, *extra))
        assert code == 2 and line.startswith("error: ") and message in line, (extra, line)
    # the same teacher named explicitly is accepted
    run = _build(train_argv(world, "ok", *cache, "--teacher", "tiny-teacher", "--teacher-pretrained",
                            world["teacher"], logs=False))
    assert run.teacher.embed_dims == [128]

    # a corrupt shard: the start-up checksum (split over ranks) refuses it
    bad = tmp_path / "bad-cache"
    shutil.copytree(world["fp16"], bad)
    flip_low_bit(os.path.join(bad, "shards", shard_files(bad)[2]), "text/0")
    code, line = run_main(train_argv(world, "err", "--teacher-cache", str(bad)))
    assert code == 2 and "sha256" in line and "csv-000002" in line and line.startswith("error: ")


def test_changed_data_is_refused(world, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(world["data_root"], data)
    moved = dict(world, csv=str(data / "train.csv"), data_root=str(data))
    # same CSV, another place: fine
    run = _build(train_argv(moved, "moved", "--teacher-cache", world["fp16"], logs=False))
    assert "teacher_image_emb" in next(iter(run.data.dataloader))
    # an image re-saved at another size: its crop boxes no longer fit (caught in a worker, still one line)
    Image.open(data / "images" / "0005.jpg").resize((30, 30)).save(data / "images" / "0005.jpg")
    argv = train_argv(moved, "resized", "--teacher-cache", world["fp16"], "--max-steps", "6")
    argv[argv.index("--workers") + 1] = "1"
    code, line = run_main(argv)
    assert code == 2 and "resized" in line and "train/5" in line and line.startswith("error: ")
    # an edited CSV: keys are row numbers, so it must match the one the cache was built from
    with open(data / "train.csv", "a") as f:
        f.write("images/0001.jpg\tan extra row\n")
    code, line = run_main(train_argv(moved, "edited", "--teacher-cache", world["fp16"]))
    assert code == 2 and "differs from the CSV" in line


def _cache_missing_row_4(world, tmp_path):
    """A cache built while image 4 was unreadable (so it lacks key train/4); the image is back afterwards."""
    data = tmp_path / "data"
    shutil.copytree(world["data_root"], data)
    moved = dict(world, csv=str(data / "train.csv"), data_root=str(data))
    os.rename(data / "images" / "0004.jpg", data / "images" / "away.jpg")
    out = tmp_path / "partial"
    assert cache_teacher.main(build_argv(moved, out)) == 0
    assert json.load(open(out / "manifest.json"))["counts"]["skipped"] == {"missing_image": 1}
    os.rename(data / "images" / "away.jpg", data / "images" / "0004.jpg")
    return moved, out


def test_missing_keys_are_an_error(world, tmp_path):
    moved, out = _cache_missing_row_4(world, tmp_path)
    code, line = run_main(train_argv(moved, "miss", "--teacher-cache", str(out)))
    assert code == 2 and "'train/4' is not in the teacher cache" in line and "--cache-missing skip" in line


def test_cache_missing_skip_substitutes_and_counts(world, tmp_path):
    moved, out = _cache_missing_row_4(world, tmp_path)
    run = _build(train_argv(moved, "skip", "--teacher-cache", str(out), "--cache-missing", "skip", logs=False))
    skipped, keys = 0, []
    for batch in run.data.dataloader:
        assert len(batch["key"]) == 4 and batch["teacher_image_emb"].shape == (4, 128)
        skipped += batch["skipped"].get("not_in_teacher_cache", 0)
        keys += batch["key"]
    assert skipped == 1 and "train/4" not in keys


def _with_uncached_csv(world, tmp_path, rows=100):
    """--train-data of the cached CSV plus a second CSV of `rows` rows the cache never saw (its keys are extra/<row>)."""
    extra = tmp_path / "extra.csv"
    lines = ["filepath\ttitle"] + [f"images/{i % N:04d}.jpg\tan uncached caption {i}" for i in range(rows)]
    extra.write_text("\n".join(lines) + "\n")
    return f"{world['csv']},{extra}"


def test_cache_missing_skip_over_a_whole_uncached_csv(world, tmp_path):
    # the bug: more than 64 uncached rows in a row raised mid-epoch ("check --data-root"), and the rows before a
    # cached one all became that one row
    both = _with_uncached_csv(world, tmp_path)
    argv = train_argv(world, "skip-csv", "--train-data", both, "--teacher-cache", world["fp16"], "--cache-missing",
                      "skip", logs=False)
    runs = [_build(argv) for _ in range(2)]
    assert runs[0].data.num_batches == 3  # the 12 cached rows in batches of 4: an epoch is the trainable rows
    orders = []
    for run in runs:
        order = []
        for epoch in (0, 1):
            run.data.set_epoch(epoch)
            keys, skipped = [], 0
            for batch in run.data.dataloader:
                assert len(batch["key"]) == 4 and batch["teacher_image_emb"].shape == (4, 128)  # full batches
                skipped += batch["skipped"].get("not_in_teacher_cache", 0)
                keys += batch["key"]
            assert skipped == 100  # every uncached row counted once per epoch
            assert sorted(keys) == sorted(f"train/{i}" for i in range(N))  # each cached row once: no repeats
            order.append(keys)
        assert order[0] != order[1]
        orders.append(order)
    assert orders[0] == orders[1]  # a function of (seed, epoch)


def test_cache_missing_skip_trains_and_resumes_exactly_through_the_cli(world, tmp_path):
    both = _with_uncached_csv(world, tmp_path)
    flags = ["--train-data", both, "--teacher-cache", world["fp16"], "--cache-missing", "skip"]
    assert main(train_argv(world, "skip-straight", *flags)) == 0
    assert main(train_argv(world, "skip-resumed", *flags, "--max-steps", "4")) == 0
    ckpt = world["root"] / "logs" / "skip-resumed" / "checkpoints"
    mid = torch.load(ckpt / "step_4.pt", weights_only=True)
    assert mid["batch_in_epoch"] == 1 and mid["skipped"] == {"not_in_teacher_cache": 200}
    assert main(train_argv(world, "skip-resumed", *flags, "--resume", "latest")) == 0
    a = torch.load(world["root"] / "logs" / "skip-straight" / "checkpoints" / "epoch_2.pt", weights_only=True)
    b = torch.load(ckpt / "epoch_2.pt", weights_only=True)
    assert a["step"] == b["step"] == 6 and a["skipped"] == b["skipped"] == {"not_in_teacher_cache": 200}
    for part in ("model", "loss"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    log = (world["root"] / "logs" / "skip-straight" / "out.log").read_text()
    assert "skipped/not_in_teacher_cache: 200" in log and "100 of 112 rows" in log


def test_cache_missing_skip_with_nothing_cached_is_one_line(world, tmp_path):
    extra = _with_uncached_csv(world, tmp_path).split(",")[1]
    code, line = run_main(train_argv(world, "none-cached", "--train-data", extra, "--teacher-cache", world["fp16"],
                                     "--cache-missing", "skip"))
    assert code == 2 and line.startswith("error: ") and "none of the 100 training rows" in line, line


# ---- WebDataset input ------------------------------------------------------------------------------------------------
def _write_tars(folder, n_shards=2, per_shard=4):
    os.makedirs(folder, exist_ok=True)
    for i in range(n_shards):
        with tarfile.open(os.path.join(folder, f"shard-{i:02d}.tar"), "w") as tf:
            for j in range(per_shard):
                w, h = SIZES[(i + j) % len(SIZES)]
                buf = io.BytesIO()
                arr = np.random.default_rng(i * 100 + j).integers(0, 255, (h, w, 3), dtype=np.uint8)
                Image.fromarray(arr).save(buf, format="JPEG", quality=85)
                for ext, payload in (("jpg", buf.getvalue()), ("txt", f"tar {i} sample {j}".encode())):
                    info = tarfile.TarInfo(f"s{i}_{j:03d}.{ext}")
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    return os.path.join(folder, "shard-{00.." + f"{n_shards - 1:02d}" + "}.tar")


def test_webdataset_cache_build_and_training_batches(world, tmp_path):
    pattern = _write_tars(str(tmp_path / "wds"))
    out = tmp_path / "wds-cache"
    argv = ["--teacher", "tiny-teacher", "--teacher-pretrained", world["teacher"], "--train-data", pattern,
            "--dataset-type", "webdataset", "--views", "2", "--out", str(out), "--batch-size", "3", "--workers", "2",
            "--device", "cpu"]
    assert cache_teacher.main(argv) == 0
    m = json.load(open(out / "manifest.json"))
    assert m["counts"]["samples"] == 8 and [r["name"] for r in m["shards"]] == ["wds-000000-shard-00",
                                                                               "wds-000001-shard-01"]
    assert m["data"]["shards"] == ["shard-00", "shard-01"]
    run = _build(["--model", "tiny-student", "--train-data", pattern, "--dataset-type", "webdataset",
                  "--train-num-samples", "8", "--batch-size", "4", "--workers", "0", "--logs", "", "--device", "cpu",
                  "--precision", "fp32", "--teacher-cache", str(out), "--recipe", "clip-kd"])
    cache = TeacherCache(str(out))
    keys = []
    for batch in run.data.dataloader:
        assert batch["teacher_image_emb"].shape == (4, 128)
        for i, key in enumerate(batch["key"]):
            e = cache.entry(key)
            k = int(batch["teacher_view_index"][i])
            assert k == 1 and torch.equal(batch["teacher_image_emb"][i], e["image"][0][k])
            assert torch.equal(batch["view"][i], e["views"][k].long())
        keys += batch["key"]
        assert train_step(run, batch) is not None
    assert sorted(keys) == sorted(f"s{i}_{j:03d}" for i in range(2) for j in range(4))


def _wds_cache_of_first_two(world, tmp_path):
    """Four shards; the cache holds only shard-00 and shard-01 (8 samples)."""
    pattern = _write_tars(str(tmp_path / "wds"), n_shards=4)
    out = tmp_path / "wds-cache"
    assert cache_teacher.main(["--teacher", "tiny-teacher", "--teacher-pretrained", world["teacher"], "--train-data",
                               pattern.replace("{00..03}", "{00..01}"), "--dataset-type", "webdataset", "--views",
                               "2", "--out", str(out), "--batch-size", "4", "--workers", "0", "--device", "cpu"]) == 0
    return pattern, out


def _wds_train_argv(data, cache, *extra):
    return ["--model", "tiny-student", "--train-data", data, "--dataset-type", "webdataset", "--train-num-samples",
            "8", "--batch-size", "4", "--workers", "0", "--logs", "", "--device", "cpu", "--precision", "fp32",
            "--teacher-cache", str(cache), "--cache-missing", "skip", "--recipe", "clip-kd", "--epochs", "1",
            "--zeroshot-frequency", "0", "--val-frequency", "0", *extra]


@pytest.mark.timeout(120)  # the bug was a reader looping forever over samples it skips
def test_webdataset_cache_missing_skip_leaves_out_uncached_shards(world, tmp_path):
    pattern, cache = _wds_cache_of_first_two(world, tmp_path)
    run = _build(_wds_train_argv(pattern, cache))
    assert run.data.extra["shards"] == [pattern.replace("{00..03}", f"{i:02d}") for i in (0, 1)]
    keys = [k for batch in run.data.dataloader for k in batch["key"]]
    assert sorted(keys) == sorted(f"s{i}_{j:03d}" for i in range(2) for j in range(4))  # each cached sample once
    # nothing cached at all: one line, before training
    code, line = run_main(_wds_train_argv(pattern.replace("{00..03}", "{02..03}"), cache))
    assert code == 2 and line.startswith("error: ") and "none of the 2 training shards" in line, line
    # a shard the cache names but whose samples it lacks (rewritten since): the reader stops with one line
    with tarfile.open(tmp_path / "wds" / "shard-01.tar", "w") as tf:
        for j in range(4):
            buf = io.BytesIO()
            Image.new("RGB", (40, 40), COLOURS[j]).save(buf, format="JPEG")
            for ext, payload in (("jpg", buf.getvalue()), ("txt", f"new sample {j}".encode())):
                info = tarfile.TarInfo(f"new_{j:03d}.{ext}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    code, line = run_main(_wds_train_argv(str(tmp_path / "wds" / "shard-01.tar"), cache))
    assert code == 2 and line.startswith("error: ") and "no usable sample" in line and "not_in_teacher_cache" in line, \
        line

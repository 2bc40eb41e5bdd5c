"""DataCompDR's shard layout read as it is: small shards the test writes in that layout (url.txt, syn.json,
paug.json, npz, json, plus the jpg/txt a user joins from DataComp). The drawn stored augmentation is replayed on the
image (crop + flip) beside its stored embedding, the ground-truth caption is paired with a synthetic one, training
runs through the real CLI and resumes exactly, and a shard needing an augmentation that is not replayed is refused
in one line."""

import io
import json
import random
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training.config import DataConfig
from training.data.common import DataTransforms
from training.data.transforms import ImageFormat, PairedViews, ViewParams, render_pixels
from training.data.wds import get_wds_dataset
from training.main import main

WIDTHS = (8, 12)  # two teachers, concatenated in the npz
N_AUG, N_SYN, N = 4, 3, 16


def sample_members(i: int, rng: np.random.Generator, extra_aug: dict | None = None) -> dict[str, bytes]:
    w, h = 60 + 4 * (i % 3), 48 + 2 * (i % 4)
    image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    jpg = io.BytesIO()
    image.save(jpg, format="JPEG", quality=95)
    augs = []
    for a in range(N_AUG):
        ch, cw = int(rng.integers(20, h)), int(rng.integers(20, w))
        aug = {"random_resized_crop": [int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw],
               "random_horizontal_flip": bool(a % 2)}
        aug.update(extra_aug or {})
        augs.append(aug)
    npz = io.BytesIO()
    np.savez(npz, image_emb=rng.normal(size=(N_AUG, sum(WIDTHS))).astype(np.float16),
             text_emb=rng.normal(size=(1 + N_SYN, sum(WIDTHS))).astype(np.float16))
    return {"jpg": jpg.getvalue(), "txt": f"ground truth {i}".encode(), "url.txt": f"http://x/{i}.jpg".encode(),
            "json": json.dumps({"uid": f"{i:06d}"}).encode(),
            "syn.json": json.dumps({"syn_text": [f"synthetic {i} {s}" for s in range(N_SYN)]}).encode(),
            "paug.json": json.dumps({"param_aug": json.dumps(augs)}).encode(), "npz": npz.getvalue()}


def write_shards(folder, extra_aug=None, shards=2) -> str:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(s * N // shards, (s + 1) * N // shards):
                for ext, data in sample_members(i, rng, extra_aug).items():
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def read_members(pattern_folder, key: str) -> dict:
    for path in sorted(pattern_folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            found = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()
                     if m.name.startswith(key + ".")}
            if found:
                return found
    raise KeyError(key)


def test_replays_the_drawn_augmentation_beside_its_embedding(tmp_path):
    import open_clip

    shards = write_shards(tmp_path / "dr")
    fmt = ImageFormat(64, (0.5,) * 3, (0.5,) * 3)
    tok = open_clip.get_tokenizer("tiny-student")
    tf = DataTransforms(tokenizer=tok, train_views=PairedViews(fmt, None, train=True, seed=0),
                        val_views=PairedViews(fmt, None, train=False), captions_per_step=2)
    data = DataConfig(train_data=shards, dataset_type="webdataset", train_num_samples=N, batch_size=4, workers=0,
                      datacompdr_teachers=",".join(map(str, WIDTHS)), wds_shuffle_buffer=1)
    info = get_wds_dataset(data, tf, seed=0)
    info.set_epoch(0)
    seen, drawn_views = 0, set()
    for batch in info.dataloader:
        for j, key in enumerate(batch["key"]):
            files = read_members(tmp_path / "dr", key)
            augs = json.loads(json.loads(files["paug.json"])["param_aug"])
            with np.load(io.BytesIO(files["npz"])) as npz:
                image_emb, text_emb = npz["image_emb"].astype(np.float32), npz["text_emb"].astype(np.float32)
            k = int(batch["teacher_view_index"][j])
            crop = augs[k]["random_resized_crop"]
            view = ViewParams(*crop, flip=augs[k]["random_horizontal_flip"])
            assert batch["view"][j].tolist() == list(view.as_tuple())
            with Image.open(io.BytesIO(files["jpg"])) as im:
                torch.testing.assert_close(batch["image"][j], render_pixels(im.convert("RGB"), view, fmt))

            def members(x):
                t = torch.from_numpy(x)
                return torch.cat([F.normalize(p, dim=-1) for p in t.split(list(WIDTHS), dim=-1)])

            torch.testing.assert_close(batch["teacher_image_emb"][j], members(image_emb[k]))
            gt, syn = batch["caption_index"][j].tolist()
            assert gt == 0 and 1 <= syn <= N_SYN  # the ground truth plus one synthetic caption
            torch.testing.assert_close(batch["teacher_text_emb"][j], members(text_emb[0]))
            torch.testing.assert_close(batch["teacher_text_emb_2"][j], members(text_emb[syn]))
            assert torch.equal(batch["text_2"][j], tok([f"synthetic {int(key)} {syn - 1}"])[0])
            drawn_views.add(k)
            seen += 1
    assert seen == N and len(drawn_views) > 1


def _argv(shards, logs, name, *extra):
    return ["--model", "tiny-student", "--train-data", shards, "--dataset-type", "webdataset",
            "--train-num-samples", str(N), "--datacompdr-teachers", ",".join(map(str, WIDTHS)),
            "--teacher-logit-scales", "100,70", "--captions-per-step", "2", "--distill", "task=1,crd=1,fd=10",
            "--batch-size", "4", "--epochs", "2", "--lr", "1e-3", "--warmup", "1", "--precision", "fp32",
            "--workers", "0", "--logs", str(logs), "--name", name, "--zeroshot-frequency", "0",
            "--val-frequency", "0", "--device", "cpu", *extra]


def test_trains_through_the_cli_and_resumes_exactly(tmp_path):
    shards = write_shards(tmp_path / "dr")
    logs = tmp_path / "logs"
    assert main(_argv(shards, logs, "straight")) == 0
    assert main(_argv(shards, logs, "resumed", "--max-steps", "5")) == 0
    assert main(_argv(shards, logs, "resumed", "--resume", "latest")) == 0
    a = torch.load(logs / "straight" / "checkpoints" / "epoch_2.pt", weights_only=True)
    b = torch.load(logs / "resumed" / "checkpoints" / "epoch_2.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.parametrize("extra", [{"rand_augment": [[3, 0.5], [7, 0.2]]}, {"random_erase": [1, 2, 3, 4]}])
def test_a_shard_needing_an_augmentation_not_replayed_is_refused(tmp_path, capsys, extra):
    shards = write_shards(tmp_path / "dr", extra_aug=extra, shards=1)
    assert main(_argv(shards, tmp_path / "logs", "refused", "--max-steps", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and next(iter(extra)) in err[0] and "not replayed" in err[0], err


def test_skipped_augmentations_and_flags_are_checked(tmp_path, capsys):
    shards = write_shards(tmp_path / "dr", extra_aug={"rand_augment": None}, shards=1)  # skipped at generation
    assert main(_argv(shards, tmp_path / "logs", "skipped-aug", "--max-steps", "1")) == 0
    argv = _argv(shards, tmp_path / "logs", "no-scales")
    i = argv.index("--teacher-logit-scales")
    assert main(argv[:i] + argv[i + 2:]) == 2
    assert "--teacher-logit-scales" in capsys.readouterr().err
    assert main(_argv(shards, tmp_path / "logs", "with-teacher", "--teacher", "tiny-teacher")) == 2


def test_the_draw_is_a_function_of_seed_epoch_and_key():
    from training.data import datacompdr

    sample = {"views": [ViewParams(0, 0, 1, 1)] * 5, "captions": ["gt", "a", "b"],
              "image_emb": torch.eye(5), "text_emb": torch.eye(3)}
    one = [datacompdr.draw(sample, 2, random.Random(f"0/{e}/k"), random.Random(f"0/{e}/k/c"))[1] for e in range(30)]
    two = [datacompdr.draw(sample, 2, random.Random(f"0/{e}/k"), random.Random(f"0/{e}/k/c"))[1] for e in range(30)]
    assert one == two and {c[1] for c in one} == {1, 2} and all(c[0] == 0 for c in one)

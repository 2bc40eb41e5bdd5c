"""Image-only students and classifiers: caption-less data, --student-kind image|classifier through the real CLI
(online and cached teacher), the zero-shot head saved with the student, the classifier loss against a NumPy
re-derivation, and the one-line errors."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training.data import infer_dataset_type
from training.data.common import DataTransforms
from training.data.imagefolder import ImageFolderDataset, read_image_folders
from training.data.transforms import ImageFormat, PairedViews
from training.distill import build_distill_loss
from training.distill.classifier import ClassifierDistillLoss
from training.errors import UsageError
from training.eval.linear_probe import _standardize, fit_linear_head, fit_logistic, select_weight_decay
from training.main import main
from training.models.image_student import ClassHeadError, create_image_student, load_image_student

CLASSES = ["blue", "green", "red"]  # sorted: line k of classnames.txt names the k-th sorted sub-folder
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
COMMON = ["--model", "resnet18", "--force-image-size", "32", "--teacher", "tiny-teacher", "--batch-size", "8",
          "--epochs", "1", "--workers", "0", "--device", "cpu", "--precision", "fp32", "--warmup", "1",
          "--val-frequency", "0", "--log-every-n-steps", "1"]


def _image(colour, seed, size=40):
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour)[None, None] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def class_folder(root, per_class=4, bad=0):
    """root/<class>/k.png + classnames.txt; `bad` corrupt files in the first class."""
    for c, name in enumerate(CLASSES):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for k in range(per_class):
            _image(COLOURS[name], 100 * c + k).save(os.path.join(root, name, f"{k}.png"))
    for k in range(bad):
        with open(os.path.join(root, CLASSES[0], f"bad{k}.jpg"), "wb") as f:
            f.write(b"not an image")
    with open(os.path.join(root, "classnames.txt"), "w") as f:
        f.write("\n".join(CLASSES) + "\n")
    return str(root)


def loose_folder(root, n=16):
    """Unlabelled images in nested folders (recursive, no classnames.txt)."""
    for k in range(n):
        sub = os.path.join(root, f"part{k % 2}", "deeper" if k % 4 == 0 else "")
        os.makedirs(sub, exist_ok=True)
        _image(COLOURS[CLASSES[k % 3]], 1000 + k).save(os.path.join(sub, f"{k:03d}.jpg"))
    return str(root)


# ---- data ---------------------------------------------------------------------------------------------------------

def test_folders_are_read_recursively_with_labels_only_from_class_folders(tmp_path):
    labelled = class_folder(tmp_path / "lab")
    unlabelled = loose_folder(tmp_path / "unl")
    assert infer_dataset_type(f"{labelled},{unlabelled}") == "imagefolder"
    table = read_image_folders([labelled, unlabelled])
    assert table.classnames == CLASSES
    assert len(table.images) == 12 + 16 and table.num_labelled == 12
    by_key = dict(zip(table.keys, table.labels))
    assert by_key["lab/green/2.png"] == 1 and by_key["lab/blue/0.png"] == 0 and by_key["lab/red/3.png"] == 2
    assert by_key["unl/part0/deeper/000.jpg"] == -1  # nested files are found
    assert sum(1 for k in table.keys if k.startswith("unl/")) == 16


def test_bad_images_are_skipped_and_counted(tmp_path):
    table = read_image_folders([class_folder(tmp_path / "lab", bad=2)])
    fmt = ImageFormat(32, (0.5,) * 3, (0.5,) * 3)
    ds = ImageFolderDataset(table, DataTransforms(tokenizer=None, train_views=PairedViews(fmt, None, train=True)),
                            True)
    bad_rows = [i for i, p in enumerate(ds.images) if os.path.basename(p).startswith("bad")]
    sample = ds[(bad_rows[0], 0)]
    assert sample["skipped"] == {"corrupt_image": 2}  # both corrupt files, then the next good one
    # the substitute is the next row (the first of the next class): the label is the substitute's own
    assert sample["key"] == "lab/green/0.png" and sample["label"].item() == 1
    assert "text" not in sample and sample["image"].shape == (3, 32, 32)


def test_folder_without_readable_image_is_one_line_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    assert main(["--student-kind", "image", *COMMON, "--train-data", str(empty), "--logs", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no image in") and str(empty) in err[0]
    broken = tmp_path / "broken"
    broken.mkdir()
    for k in range(3):
        (broken / f"{k}.jpg").write_bytes(b"garbage")
    assert main(["--student-kind", "image", *COMMON, "--train-data", str(broken), "--logs", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no readable image in" in err[0] and "corrupt_image 3" in err[0]


# ---- losses -------------------------------------------------------------------------------------------------------

def test_emb_without_text_matches_numpy():
    torch.manual_seed(0)
    s = torch.randn(6, 16, dtype=torch.float64)
    t = F.normalize(torch.randn(6, 16, dtype=torch.float64), dim=-1)
    for metric in ("mse", "l1", "smooth_l1", "cosine"):
        loss = build_distill_loss("emb=1", 16, 16, emb_metric=metric)  # equal widths: no loss-side projection
        got = loss(student_image=s, student_text=None, student_scale=None, teacher_image=t, teacher_text=None)
        d, sn, tn = s.numpy() - t.numpy(), s.numpy(), t.numpy()
        want = {"mse": np.mean(d ** 2), "l1": np.mean(np.abs(d)),
                "smooth_l1": np.mean(np.where(np.abs(d) < 1, 0.5 * d ** 2, np.abs(d) - 0.5)),
                "cosine": np.mean(1 - (sn * tn).sum(1) / np.linalg.norm(sn, axis=1) / np.linalg.norm(tn, axis=1))}
        assert float(got["total"]) == pytest.approx(want[metric], rel=1e-10), metric


def test_classifier_loss_matches_numpy():
    torch.manual_seed(1)
    c, d, tau = 5, 8, 2.5
    loss = ClassifierDistillLoss(c, d, "linear", kd_temperature=tau, kd_weight=0.7, ce_weight=0.3).double()
    w, b = torch.randn(c, d, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    loss.set_teacher_head(w, b)
    s, t = torch.randn(4, c, dtype=torch.float64), torch.randn(4, d, dtype=torch.float64)
    labels = torch.tensor([2, -1, 0, -1])
    out = loss(s, t, labels)

    def softmax(x):
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    zt = (t.numpy() / np.linalg.norm(t.numpy(), axis=1, keepdims=True)) @ w.numpy().T + b.numpy()
    pt, ps = softmax(zt / tau), softmax(s.numpy() / tau)
    kd = tau ** 2 * np.mean((pt * (np.log(pt) - np.log(ps))).sum(1))
    p = softmax(s.numpy())
    ce = -np.mean([np.log(p[0, 2]), np.log(p[2, 0])])  # labelled rows only
    assert float(out["kd"]) == pytest.approx(0.7 * kd, rel=1e-6)
    assert float(out["ce"]) == pytest.approx(0.3 * ce, rel=1e-6)
    assert float(out["total"]) == pytest.approx(0.7 * kd + 0.3 * ce, rel=1e-6)
    none = loss(s, t, torch.full((4,), -1))  # no label in the batch: ce is 0, not NaN
    assert float(none["ce"]) == 0.0


def test_linear_head_is_the_standardised_probe_on_raw_features():
    torch.manual_seed(2)
    x = F.normalize(torch.randn(60, 6) + torch.arange(3).repeat(20)[:, None] * 0.8, dim=-1)
    y = torch.arange(3).repeat(20)
    weight, bias, wd = fit_linear_head(x, y, 3, wd_grid=(1e-4, 1e-2), max_iter=200)
    assert wd == select_weight_decay(x, y, 3, (1e-4, 1e-2), max_iter=200)[0]
    xs, = _standardize(x)
    w, b = fit_logistic(xs, y, 3, wd, 200)
    torch.testing.assert_close(x @ weight.T + bias, xs @ w + b, atol=1e-4, rtol=1e-4)


def test_class_head_that_does_not_match_is_refused():
    student = create_image_student("resnet18", "image", 128, force_image_size=32)
    with pytest.raises(ClassHeadError, match="does not match the student"):
        student.set_class_head(torch.randn(3, 64), CLASSES, 100.0)
    with pytest.raises(ClassHeadError, match="3 rows but 2 class names"):
        student.set_class_head(torch.randn(3, 128), CLASSES[:2], 100.0)
    assert issubclass(ClassHeadError, UsageError)  # one line, exit 2 at the CLI


# ---- the real CLI -------------------------------------------------------------------------------------------------

def _zeroshot_by_hand(student, folder):
    """Top-1 of the saved head on the class folder, computed here from the student's embeddings."""
    from training.data.transforms import EvalTransform

    table = read_image_folders([folder])
    tf = EvalTransform(student.image_format)
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in table.images])
    with torch.no_grad():
        emb = F.normalize(student.encode_image(x), dim=-1)
    pred = (emb @ student.class_embeddings.T).argmax(1)
    return float((pred == torch.tensor(table.labels)).float().mean())


def test_caption_less_training_online_saves_a_zero_shot_head(tmp_path, capsys):
    lab, unl = class_folder(tmp_path / "lab"), loose_folder(tmp_path / "unl")
    logs = str(tmp_path / "logs")
    assert main(["--student-kind", "image", *COMMON, "--train-data", f"{lab},{unl}", "--zeroshot-data", lab,
                 "--logs", logs, "--name", "img"]) == 0
    ckpt = os.path.join(logs, "img", "checkpoints", "epoch_1.pt")
    student = load_image_student(ckpt)
    assert student.classnames == CLASSES and student.class_embeddings.shape == (3, 128)
    # the head is the teacher's zero-shot classifier: rebuild it from the same (seeded, random-init) teacher
    from training.eval.templates import OPENAI_IMAGENET_TEMPLATES  # noqa: F401 (the folder has no templates.txt)
    from training.eval.zeroshot import build_classifier
    from training.models import create_clip

    torch.manual_seed(0)
    teacher = create_clip("tiny-teacher", None, torch.device("cpu")).eval()
    import open_clip

    head = build_classifier(teacher, open_clip.get_tokenizer("tiny-teacher"), CLASSES,
                            list(OPENAI_IMAGENET_TEMPLATES), torch.device("cpu"))
    torch.testing.assert_close(student.class_embeddings, head, atol=1e-5, rtol=1e-5)
    assert float(student.logit_scale.exp()) == pytest.approx(float(teacher.logit_scale.detach().exp()), rel=1e-6)
    # the evaluation in training scored the saved head
    log = open(os.path.join(logs, "img", "out.log")).read() if os.path.exists(
        os.path.join(logs, "img", "out.log")) else capsys.readouterr().err
    top1 = _zeroshot_by_hand(student, lab)
    assert f"zeroshot/top1: {top1:.4g}" in log


def test_caption_less_training_from_the_teacher_cache(tmp_path):
    from training.cache_teacher import main as cache_main

    unl = loose_folder(tmp_path / "unl")
    cache = str(tmp_path / "cache")
    assert cache_main(["--teacher", "tiny-teacher", "--train-data", unl, "--out", cache, "--batch-size", "8",
                       "--workers", "0", "--device", "cpu", "--cache-dtype", "fp32"]) == 0
    logs = str(tmp_path / "logs")
    args = [a for a in COMMON if a not in ("--teacher", "tiny-teacher")]
    assert main(["--student-kind", "image", *args, "--train-data", unl, "--teacher-cache", cache, "--logs", logs,
                 "--name", "cached", "--distill", "emb=1", "--emb-metric", "cosine"]) == 0
    student = load_image_student(os.path.join(logs, "cached", "checkpoints", "epoch_1.pt"))
    assert not student.has_head  # no class names and no live teacher: trained, no head (a warning says so)


def test_csv_without_captions_trains_an_image_student(tmp_path):
    unl = loose_folder(tmp_path / "unl")
    csv = tmp_path / "images.csv"
    rows = [os.path.relpath(os.path.join(r, f), unl) for r, _, fs in os.walk(unl) for f in fs]
    csv.write_text("filepath\n" + "\n".join(sorted(rows)) + "\n")
    assert main(["--student-kind", "image", *COMMON, "--train-data", str(csv), "--data-root", unl,
                 "--csv-caption-key", "", "--logs", str(tmp_path / "logs"), "--name", "csv"]) == 0


def test_classifier_kd_through_the_cli(tmp_path):
    lab, unl = class_folder(tmp_path / "lab"), loose_folder(tmp_path / "unl")
    logs = str(tmp_path / "logs")
    for head in ("text", "linear"):
        assert main(["--student-kind", "classifier", "--teacher-head", head, "--classifier-ce-weight", "0.5",
                     "--kd-temperature", "2", *COMMON, "--train-data", f"{lab},{unl}", "--logs", logs,
                     "--name", head]) == 0
        student = load_image_student(os.path.join(logs, head, "checkpoints", "epoch_1.pt"))
        assert student.kind == "classifier" and student.classnames == CLASSES
        assert student(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
        loss_state = torch.load(os.path.join(logs, head, "checkpoints", "epoch_1.pt"), weights_only=True)["loss"]
        assert loss_state["head_weight"].shape == (3, 128) and loss_state["head_weight"].abs().sum() > 0


@pytest.mark.parametrize("extra, message", [
    (["--student-kind", "image", "--accum-freq", "2"], "--accum-freq > 1 is not supported with --student-kind image"),
    (["--student-kind", "image", "--distill", "task=1,emb=1"], "trains on emb only"),
    (["--teacher-head", "linear"], "--teacher-head and --classifier-ce-weight need --student-kind classifier"),
])
def test_image_kind_refusals_are_one_line(tmp_path, capsys, extra, message):
    unl = loose_folder(tmp_path / "unl", n=8)
    assert main([*COMMON, *extra, "--train-data", unl, "--logs", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
